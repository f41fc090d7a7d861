"""Load CLIP (keyed) + Offload CLIP inside a real ComfyUI: the run after an offload reads no CLIP file.

The example workflow (workflows/offload_clip_keyed_api.json) runs over HTTP with a full-size random
CLIP-L (every key of the real file, so its embeddings are finite and its weights deterministic) and a
tiny SD1.5-layout UNet that ComfyUI's own UNETLoader detects, then core KSampler samples two steps.
In process, comfy.utils.load_torch_file is wrapped to count the disk reads of the CLIP file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
WORKFLOW = HERE.parents[1] / "workflows" / "offload_clip_keyed_api.json"
CLIP_FILE = "slipstream_tiny_clip_l_full.safetensors"
UNET_SD15 = "slipstream_tiny_sd15_unet.safetensors"


def write_full_clip_l(models_dir: Path) -> Path:
    """Every tensor of an OpenAI CLIP-L text model (HF key names, fp16, seeded): ~250 MB, written once."""
    path = models_dir / "text_encoders" / CLIP_FILE
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(11)
    width, mlp, prefix = 768, 3072, "text_model."
    shapes = {f"{prefix}embeddings.token_embedding.weight": (49408, width),
              f"{prefix}embeddings.position_embedding.weight": (77, width),
              f"{prefix}final_layer_norm.weight": (width,), f"{prefix}final_layer_norm.bias": (width,),
              "text_projection.weight": (width, width)}
    for i in range(12):
        layer = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (width, width)
            shapes[f"{layer}self_attn.{proj}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = shapes[f"{layer}{norm}.bias"] = (width,)
        shapes[f"{layer}mlp.fc1.weight"], shapes[f"{layer}mlp.fc1.bias"] = (mlp, width), (mlp,)
        shapes[f"{layer}mlp.fc2.weight"], shapes[f"{layer}mlp.fc2.bias"] = (width, mlp), (width,)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("layer_norm1.weight") or key.endswith("layer_norm2.weight") or key.endswith("norm.weight"):
            sd[key] = torch.ones(shape, dtype=torch.float16)
        else:
            sd[key] = (torch.randn(shape, generator=gen) * 0.02).half()
    partial = path.with_suffix(".partial")
    save_file(sd, str(partial))
    partial.replace(path)
    return path


def _report_line(stats: str, key: str) -> str:
    (line,) = [line for line in stats.splitlines() if line.strip().startswith("[CLIP]") and key in line]
    return line


def test_workflow_second_run_is_served_from_ram(comfyui, comfy_inprocess, harness_module):
    write_full_clip_l(comfyui.models_dir)
    comfy_inprocess.run(HERE / "scenarios_int8.py", "write_tiny_sd15",
                        {"unet_file": UNET_SD15, "lora_file": "slipstream_tiny_sd15_lora.safetensors"})
    (comfyui.models_dir / "diffusion_models").mkdir(parents=True, exist_ok=True)
    shutil.copy(comfy_inprocess.models_dir / "diffusion_models" / UNET_SD15,
                comfyui.models_dir / "diffusion_models" / UNET_SD15)
    api = json.loads(WORKFLOW.read_text(encoding="utf-8"))

    first = comfyui.run(api, timeout=600)
    (stats1,) = harness_module.ui_texts(first, "9")
    print(stats1)
    (line1,) = [line for line in stats1.splitlines() if line.strip().startswith("[CLIP] clip:" + CLIP_FILE + "@")]
    key = line1.split()[1]
    assert "held, hits 0" in line1
    (latent_file,) = harness_module.output_files(first, comfyui.base)
    latent = load_file(str(latent_file))["latent_tensor"]
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()

    # A prompt without the loader: ComfyUI's own cache forgets the loader's CLIP, only ours holds it.
    comfyui.run({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                 "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "between"}}})
    second = comfyui.run(api, timeout=600)
    cached = {n for m in second["status"]["messages"] if m[0] == "execution_cached" for n in m[1]["nodes"]}
    assert "1" not in cached                                   # the loader really ran again ...
    (stats2,) = harness_module.ui_texts(second, "9")
    print(stats2)
    assert "held, hits 1" in _report_line(stats2, key)         # ... and found the CLIP in the DRAM cache
    assert f"Load CLIP (keyed) {key}: served from the DRAM cache (no disk read)" in comfyui.log_text()
    (latent_file2,) = [f for f in harness_module.output_files(second, comfyui.base) if f != latent_file]
    assert torch.equal(load_file(str(latent_file2))["latent_tensor"], latent)   # same CLIP, same result


def test_keyed_loader_reads_the_file_once_and_core_clips_get_one_weights_key(comfy_inprocess):
    write_full_clip_l(comfy_inprocess.models_dir)
    out = comfy_inprocess.run(HERE / "scenarios_memory.py", "keyed_clip_reuse", {"clip_file": CLIP_FILE})
    print(out["first_stats"], out["second_stats"], sep="\n")
    assert out["host"] == "comfyui" and out["clip_class"] == "comfy.sd.CLIP"
    assert out["reads_first"] == [CLIP_FILE] and out["reads_second"] == []          # no disk read the 2nd time
    assert out["first_key"] == out["second_key"] == out["is_changed"]
    assert out["first_key"].startswith(f"clip:{CLIP_FILE}@") and out["same_object"] and out["cond_finite"]
    assert "held, hits 1" in _report_line(out["second_stats"], out["first_key"])
    assert out["core_reads"] == [CLIP_FILE, CLIP_FILE]                               # core reads on every load
    assert out["core_key1"].startswith("clip:weights:SD1ClipModel@")
    assert out["patched_in_place"] and out["core_key2"] == out["core_key1"]


def test_keyed_loaders_take_core_loaders_inputs(comfyui):
    """Same inputs as core CLIPLoader / DualCLIPLoader: names, types, combo lists, defaults."""
    info = comfyui.object_info()
    for ours, core in (("SlipstreamCLIPLoaderKeyed", "CLIPLoader"), ("SlipstreamDualCLIPLoaderKeyed", "DualCLIPLoader")):
        for section in ("required", "optional"):
            mine, theirs = info[ours]["input"].get(section, {}), info[core]["input"].get(section, {})
            assert list(mine) == list(theirs), (ours, section)
            for name in mine:
                assert mine[name][0] == theirs[name][0], (ours, name)
