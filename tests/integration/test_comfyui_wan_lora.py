"""Wan LoRAs applied at run time inside a real ComfyUI: changing a strength re-runs the LoRA and the
sampler, while ComfyUI serves the model loader (and the text encoder) from its cache."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LORA_FILE = "slipstream_tiny_wan_style.safetensors"


def write_lora(comfyui) -> None:
    """A rank-4 LoRA on every attention q and FFN input of the tiny T2V DiT (shapes read from its file)."""
    from slipstream.models.wan import demo_assets as assets

    assets.write_tiny_wan_models(comfyui.models_dir, comfyui.input_dir)
    dit = comfyui.models_dir / "diffusion_models" / assets.DIT_T2V
    g = torch.Generator().manual_seed(0)
    lora = {}
    with safe_open(str(dit), "pt") as f:
        for key in f.keys():
            if key.endswith(("self_attn.q.weight", "ffn.0.weight")):
                out_f, in_f = f.get_slice(key).get_shape()
                stem = "diffusion_model." + key.removesuffix(".weight")
                lora[stem + ".lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.1
                lora[stem + ".lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.1
    path = comfyui.models_dir / "loras" / LORA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(path))


def prompt(strength: float) -> dict:
    from slipstream.models.wan import demo_assets as assets

    return {
        "1": {"class_type": "SlipstreamWanModelLoader",
              "inputs": {"model": assets.DIT_T2V, "base_precision": "fp32", "quantization": "disabled",
                         "load_device": "main_device"}},
        "2": {"class_type": "SlipstreamWanTextEncoderLoader",
              "inputs": {"model_name": assets.TEXT_ENCODER, "precision": "fp32", "load_device": "offload_device"}},
        "3": {"class_type": "SlipstreamWanTextEncode",
              "inputs": {"positive_prompt": "a fox in snow", "negative_prompt": "blurry", "device": "gpu",
                         "force_offload": True, "text_encoder": ["2", 0]}},
        "4": {"class_type": "SlipstreamWanEmptyEmbeds", "inputs": {"width": 64, "height": 48, "num_frames": 5}},
        "5": {"class_type": "SlipstreamWanLoraSelect",
              "inputs": {"lora": LORA_FILE, "strength": strength, "blocks": ""}},
        "6": {"class_type": "SlipstreamWanApplyLora", "inputs": {"model": ["1", 0], "lora": ["5", 0], "low_mem": False,
                                                               "lora_mode": "exact (patch weights at run time)"}},
        "7": {"class_type": "SlipstreamWanSampler",
              "inputs": {"model": ["6", 0], "image_embeds": ["4", 0], "text_embeds": ["3", 0], "steps": 2,
                         "cfg": 5.0, "shift": 5.0, "seed": 1, "scheduler": "euler", "denoise": 1.0,
                         "force_offload": True, "batched_cfg": "auto"}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}},
    }


def _cached(entry) -> set[str]:
    return {node for kind, body in entry["status"]["messages"] if kind == "execution_cached" for node in body["nodes"]}


def test_strength_change_does_not_reload_the_model(comfyui):
    write_lora(comfyui)
    comfyui.run(prompt(1.0))
    second = comfyui.run(prompt(0.4))
    cached = _cached(second)
    assert {"1", "2", "3", "4"} <= cached, f"the loader or encoders ran again: cached {sorted(cached)}"
    assert not {"5", "6", "7"} & cached, "the LoRA, apply and sampler nodes must re-run for a new strength"
