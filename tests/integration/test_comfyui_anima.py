"""Anima context tokens inside a real ComfyUI: train, patch and sample through /prompt, and in process.

ComfyUI v0.8.0 predates Anima, so its core loaders cannot load it; the pack's loaders build the model
from ComfyUI's own Cosmos DiT (host/comfy_anima.py). The full example workflow then runs with core
CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode and SaveImage around our nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from slipstream.models.anima.tiny import TinyAnimaFiles, prepare_demo, write_tiny_anima

HERE = Path(__file__).resolve().parent
WORKFLOW = HERE.parents[1] / "workflows" / "anima_reference_api.json"


def _small(api: dict, **overrides) -> dict:
    """The example workflow with CPU-sized settings (the file keeps realistic ones for users)."""
    api = json.loads(json.dumps(api))
    api["5"]["inputs"].update(training_steps=6, training_image_size=128)
    api["10"]["inputs"].update(width=128, height=128)
    api["11"]["inputs"].update(steps=3)
    for key, value in overrides.items():
        node, name = key.split(".")
        api[node]["inputs"][name] = value
    return api


def _image(entry: dict, base: Path) -> np.ndarray:
    info = entry["outputs"]["13"]["images"][0]
    return np.asarray(Image.open(base / "output" / info["subfolder"] / info["filename"])).astype(np.int16)


def test_example_workflow_trains_patches_and_samples(comfyui, harness_module):
    prepare_demo(comfyui.models_dir, comfyui.input_dir)
    api = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    entry = comfyui.run(_small(api), timeout=600)
    files = harness_module.output_files(entry, comfyui.base)
    assert any(f.suffix == ".png" for f in files) and any(f.suffix == ".safetensors" for f in files), files

    unpatched = comfyui.run(_small(api, **{"11.model": ["1", 0], "13.filename_prefix": "unpatched"}), timeout=600)
    off = comfyui.run(_small(api, **{"7.reference_context_scale": 0.0, "13.filename_prefix": "off"}), timeout=600)
    on = comfyui.run(_small(api, **{"7.reference_context_scale": 2.0, "13.filename_prefix": "on"}), timeout=600)
    assert np.array_equal(_image(off, comfyui.base), _image(unpatched, comfyui.base))
    assert not np.array_equal(_image(on, comfyui.base), _image(unpatched, comfyui.base))


def test_trainer_and_patch_on_comfyuis_own_model_objects(comfy_inprocess):
    files: TinyAnimaFiles = write_tiny_anima(comfy_inprocess.models_dir)
    prepare_demo(comfy_inprocess.models_dir, comfy_inprocess.base_dir / "input")
    result = comfy_inprocess.run(HERE / "scenarios_anima.py", "train_and_patch", {
        "dit": files.dit, "text_encoder": files.text_encoder, "vae": files.vae, "image": "anima_reference.png"})
    assert result["host"] == "comfyui"
    patcher, base_model, (dit_class, parent) = result["model_types"]
    assert patcher == "comfy.model_patcher.ModelPatcher" and parent.startswith("comfy.ldm.")
    assert result["vae_type"] == "comfy.sd.VAE"
    assert result["clip_patcher"] == "comfy.model_patcher.ModelPatcher" and result["clip_managed"]
    assert result["weights_unchanged"] and result["tokens_shape"] == [2, 4, 32]
    assert "token norm before" in result["info"]
    assert result["scale0_equal"] and result["unpatched_again_equal"]
    assert result["scale1_diff"] > 1e-6


PROMPTS = [
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile",
    " with a leading space", "  two  spaces, tabs\tand\nnewlines.", "score_9, (blue eyes:1.2), \\(escaped\\)",
    "A photo of a cat's toy — it's 3.5 inches wide!", "ÉlÈve naïve café 東京タワー 123456 @artist ½ ² <|endoftext|>", "",
]


def test_models_and_tokenizers_match_comfyuis_reference_code(comfy_inprocess):
    result = comfy_inprocess.run(HERE / "scenarios_anima.py", "matches_comfyui_reference", {"prompts": PROMPTS})
    assert result["dit_keys_match"]
    assert result["dit_max_diff"] < 1e-4, result
    assert result["qwen3_max_diff"] < 1e-4, result
    assert result["tokenizer_mismatches"] == []
