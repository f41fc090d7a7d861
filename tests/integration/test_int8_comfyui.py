"""The INT8 nodes inside a real ComfyUI.

1. In process (scenarios_int8.py): a tiny Wan 2.1 DiT, float and int8, through our node with
   ComfyUI building the architecture; one core KSampler step; a LoRA through core
   LoraLoaderModelOnly (patch, unpatch, on-the-fly weight functions); save and reload bit for bit.
2. Over HTTP: a workflow users would queue — our loader (on-the-fly) → Save INT8 Model, then the
   saved int8 file → core LoraLoaderModelOnly → core KSampler (one step) → core SaveLatent, on a
   tiny SD1.5-layout UNet (the smallest text-conditioned model ComfyUI detects that fits a CPU
   test; its conditioning comes from core CLIPLoader/CLIPTextEncode, zeroed out).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FLOAT_WAN = "slipstream_tiny_wan_fp32.safetensors"
LORA_WAN = "slipstream_tiny_wan_lora.safetensors"
LORA_KEY = "lora_unet_blocks_0_self_attn_q"


def write_tiny_wan(models_dir: Path) -> None:
    from slipstream.models.wan.config import tiny
    from slipstream.models.wan.dit import random_state_dict

    unet = models_dir / "diffusion_models" / FLOAT_WAN
    unet.parent.mkdir(parents=True, exist_ok=True)
    config = tiny("t2v")                                   # dim 256, 2 heads of 128, text_dim 4096
    save_file(random_state_dict(config, seed=3), str(unet))
    gen = torch.Generator().manual_seed(4)
    rank = 4
    lora = {f"{LORA_KEY}.lora_up.weight": torch.randn(config.dim, rank, generator=gen) * 0.1,
            f"{LORA_KEY}.lora_down.weight": torch.randn(rank, config.dim, generator=gen) * 0.1,
            f"{LORA_KEY}.alpha": torch.tensor(float(rank))}
    (models_dir / "loras").mkdir(exist_ok=True)
    save_file(lora, str(models_dir / "loras" / LORA_WAN))


@pytest.fixture(scope="module")
def wan_result(comfy_inprocess):
    write_tiny_wan(comfy_inprocess.models_dir)
    out = comfy_inprocess.run(HERE / "scenarios_int8.py", "wan_int8",
                              {"float_file": FLOAT_WAN, "lora_file": LORA_WAN, "lora_key": LORA_KEY})
    print({k: v for k, v in out.items()})
    return out


def test_comfyui_builds_the_model_and_our_ops_quantize_it(wan_result):
    r = wan_result
    assert r["host"] == "comfyui" and r["model_class"] == "WAN21"
    assert r["q_layer_class"].endswith("Int8Operations.Linear")
    assert r["kinds"]["int8"] == 2 * 10 and r["head_kind"] == "float"     # Wan preset keeps the head float
    assert r["out_dtype"] == "torch.float32" and r["rel_vs_float"] < 0.03


def test_one_core_ksampler_step(wan_result):
    assert wan_result["sample_finite"] and wan_result["sample_rel_vs_float"] < 0.05


def test_the_ksampler_step_runs_the_cpu_backend_this_machine_selects(wan_result):
    """On CPUs with AMX or VNNI every int8 call of the step goes through the prepacked oneDNN kernel."""
    from slipstream.kernels import int8_onednn

    r = wan_result
    calls = r["ksampler_kernel_calls"]
    if int8_onednn.backend() != int8_onednn.BACKEND_PREPACKED:
        assert calls.get(int8_onednn.BACKEND_INT_MM, 0) > 0
        pytest.skip(f"this machine runs {int8_onednn.describe()}")
    assert r["int8_backend"].startswith("onednn-prepacked (")
    assert r["packed_layers"] == 20
    assert calls.get("onednn-prepacked", 0) >= 20 and set(calls) == {"onednn-prepacked"}, calls


def test_saved_file_keeps_float_layers_as_they_were(comfy_inprocess):
    """Save INT8 Model inside ComfyUI on CPU: bf16 layers stay bf16 (ComfyUI builds CPU models in fp32)."""
    from slipstream.models.wan.config import tiny
    from slipstream.models.wan.dit import random_state_dict

    name = "slipstream_tiny_wan_bf16.safetensors"
    target = comfy_inprocess.models_dir / "diffusion_models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_state_dict(tiny("t2v"), seed=5, dtype=torch.bfloat16), str(target))
    r = comfy_inprocess.run(HERE / "scenarios_int8.py", "save_keeps_float_dtype", {"float_file": name})
    assert r["int8_layers"] == 20 and r["kept"] > 0
    assert r["n_changed"] == 0, r["changed"]
    assert r["f32_tensors"] == [], r["f32_tensors"]
    assert r["saved_bytes"] < r["source_bytes"]


def test_lora_dequantize_patch_requantize_and_unpatch(wan_result):
    r = wan_result
    assert r["scale_changed"]                               # re-quantized with a fresh scale
    assert r["lora_moved_by_delta_rel"] < 0.15              # the delta survived re-quantization
    assert r["lora_patched_rel"] < 0.02
    assert r["lora_changes_sample"] and r["lora_output_differs"]
    assert r["unpatch_exact"] and r["unpatched_output_exact"]
    assert r["weight_function_matches_bake"] < 0.02
    assert r["cast_weights_rel"] == 0.0                     # ComfyUI's offload casting path: same result


def test_saved_int8_file_reloads_bit_for_bit(wan_result):
    r = wan_result
    assert "20 int8 layers" in r["saved_text"]
    assert r["reload_state_equal"] and r["reload_kinds"]["int8"] == 20     # every tensor, bit for bit
    assert r["reload_output_rel"] < 1e-5
    print("ComfyUI's own UNETLoader on our int8 file:", r["core_loader"])


def test_comfyui_is_handed_packed_int8_weights_where_the_cpu_runs_them_packed(wan_result):
    """ComfyUI's loader keeps the whole state dict referenced until every layer is loaded: weights packed
    only as their layer loads would sit beside their plain copies (twice the int8 bytes in RAM), so the
    file is read into packed weights."""
    r = wan_result
    if r["int8_backend"].startswith("onednn-prepacked"):
        assert r["reload_given_int8"] == {"packed": 20, "plain": 0}
    else:
        assert r["reload_given_int8"] == {"packed": 0, "plain": 20}


def test_saved_layout_matches_comfy_kitchen(wan_result):
    """comfy-kitchen's TensorWiseINT8Layout (what ComfyUI's int8 support runs on) reads our tensors to the
    same weight and the same layer output: scale shape, rotation convention and groups agree."""
    k = wan_result["kitchen"]
    if not k["available"]:
        pytest.skip(f"comfy_kitchen not importable in ComfyUI's environment: {k['error']}")
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        layer = k[name]
        assert layer["conf"] == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
        assert layer["scale_shape"][1] == 1
        assert layer["dequant_max_abs"] <= 1e-5 * layer["weight_abs_max"]
        assert layer["output_rel"] < 2e-3
        assert layer["wrapper_rel"] < 2e-3          # our CUDA dispatch passes kitchen the right arguments


def test_each_load_gets_its_own_operations_class(wan_result):
    assert wan_result["ops_classes_distinct"] and "int8" not in wan_result["second_load_kinds"]


# ----------------------------------------------------------------------------- the HTTP workflow

UNET_SD15 = "slipstream_tiny_sd15_unet.safetensors"
CLIP_FILE = "slipstream_tiny_clip_l.safetensors"
LORA_SD15 = "slipstream_tiny_sd15_lora.safetensors"


def _memory_tests():
    """The memory family's integration module, for its tiny CLIP-L writer (one helper, not two)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slipstream_it_memory", HERE / "test_comfyui_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_sd15(comfy_inprocess) -> None:
    """ComfyUI's own UNet class builds the random-weight file, so its key layout is ComfyUI's."""
    comfy_inprocess.run(HERE / "scenarios_int8.py", "write_tiny_sd15", {"unet_file": UNET_SD15,
                                                                       "lora_file": LORA_SD15})


def test_workflow_float_to_int8_then_lora_and_one_step(comfyui, comfy_inprocess, harness_module):
    write_tiny_clip_l = _memory_tests().write_tiny_clip_l   # one real CLIP-L key; ComfyUI fills the rest

    write_tiny_sd15(comfy_inprocess)
    for sub, name in (("diffusion_models", UNET_SD15), ("loras", LORA_SD15)):
        (comfyui.models_dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(comfy_inprocess.models_dir / sub / name, comfyui.models_dir / sub / name)
    write_tiny_clip_l(comfyui.models_dir)
    quantize = {
        "1": {"class_type": "OTUNetLoaderW8A8", "inputs": {"unet_name": UNET_SD15, "weight_dtype": "default",
                                                           "model_type": "auto", "on_the_fly_quantization": True}},
        "2": {"class_type": "SlipstreamSaveInt8Model", "inputs": {"model": ["1", 0],
                                                                 "filename_prefix": "int8/tiny_sd15"}},
    }
    entry = comfyui.run(quantize)
    assert "int8 layers" in entry["outputs"]["2"]["text"][0]
    (saved,) = sorted((comfyui.output_dir / "int8").glob("tiny_sd15_*.safetensors"))
    assert saved.stat().st_size > 0
    shutil.copy(saved, comfyui.models_dir / "diffusion_models" / "tiny_sd15_int8.safetensors")

    def sample(strength: float) -> dict:
        return {
            "1": {"class_type": "OTUNetLoaderW8A8", "inputs": {"unet_name": "tiny_sd15_int8.safetensors",
                                                               "weight_dtype": "default", "model_type": "sdxl",
                                                               "on_the_fly_quantization": False}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": LORA_SD15,
                                                                  "strength_model": strength}},
            "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["3", 0]}},
            # The one-key CLIP file leaves most CLIP weights uninitialised (NaN text embeddings):
            # zero them, as for an unconditional run. A real CLIP-L would be a 250 MB test file.
            "8": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "simple",
                                                       "positive": ["8", 0], "negative": ["8", 0],
                                                       "latent_image": ["5", 0], "denoise": 1.0}},
            "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0],
                                                         "filename_prefix": f"int8/latent_{strength}"}},
        }

    latents = []
    for strength in (0.0, 1.0):
        (path,) = harness_module.output_files(comfyui.run(sample(strength)), comfyui.base)
        from safetensors.torch import load_file

        latents.append(load_file(str(path))["latent_tensor"])
    assert all(torch.isfinite(t).all() for t in latents)
    assert not torch.equal(latents[0], latents[1])            # the LoRA reached our int8 layers
    log = comfyui.log_text()
    assert "int8 Linear layers" in log and "detected SDXL / SD UNet" in log
