"""Wan Model to core MODEL inside a real ComfyUI, and core text encoding feeding the Wan Sampler.

1. In process (scenarios_wan_core.py): our Wan Model Loader (int8, block swap) -> Wan Model to core
   MODEL -> core ModelSamplingSD3 -> core KSampler, with conditioning from core CLIPLoader (umT5, type
   wan) and CLIPTextEncode; the MODEL is core's WAN21 with our int8 layers, the block patches run
   around the swapped block; core LoraLoaderModelOnly on it; a loader-merged LoRA as core patches.
2. In process: core CLIPLoader -> CLIPTextEncode -> Wan Text Embeds from Conditioning -> Wan Sampler.
3. In process: an I2V file through our loader and the bridge, sampled by core KSampler with core
   WanImageToVideo's conditioning and latent (the start image encoded by core's VAE).
4. Over HTTP: the workflow users queue — Wan Model Loader + Wan Block Swap -> Wan Model to core MODEL
   -> LoraLoaderModelOnly -> ModelSamplingSD3 -> KSampler -> SaveLatent.
5. Over HTTP: the example workflow workflows/wan_core_ksampler_api.json as shipped, with tiny files and a
   CPU-sized video, through core VAELoader / VAEDecode to an mp4 from Video Combine.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parents[1] / "workflows" / "wan_core_ksampler_api.json"
VAE = "slipstream_core_tiny_wan_vae.safetensors"
DIT = "slipstream_core_tiny_wan_t2v.safetensors"          # text_dim 4096: core umT5 conditioning
DIT_768 = "slipstream_core_tiny_wan_t2v_768.safetensors"  # text_dim 768: the HTTP test's CLIP-L conditioning
DIT_I2V = "slipstream_core_tiny_wan_i2v.safetensors"     # Wan 2.1 I2V: 36 input channels, CLIP branch
LORA = "slipstream_core_tiny_wan_lora.safetensors"
UMT5 = "slipstream_tiny_umt5_4096.safetensors"
# umT5 geometry for core's config (the form of its umt5_config_xxl.json): 4096 wide and 24 blocks, as
# core's detection of a umT5-XXL file requires, everything else tiny.
UMT5_SHAPE = {"d_model": 4096, "num_layers": 24, "num_heads": 2, "d_kv": 8, "d_ff": 16, "vocab_size": 320}
UMT5_CONFIG = {**UMT5_SHAPE, "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1,
               "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0, "is_encoder_decoder": True,
               "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "umt5",
               "num_decoder_layers": 24, "output_past": True, "pad_token_id": 0,
               "relative_attention_num_buckets": 32, "tie_word_embeddings": False}


def write_models(models_dir: Path) -> None:
    """The tiny DiTs, a LoRA on every block's self-attention query, and the 4096-wide tiny umT5 with its
    SentencePiece model embedded (ComfyUI's HF key names, as released umT5 files have them)."""
    from slipstream.models.wan import demo_assets as assets
    from slipstream.models.wan.config import tiny
    from slipstream.models.wan.dit import random_state_dict
    from slipstream.models.wan.t5 import UMT5Config, UMT5Encoder

    if (models_dir / "text_encoders" / UMT5).exists():
        return
    for sub in ("diffusion_models", "loras", "text_encoders"):
        (models_dir / sub).mkdir(parents=True, exist_ok=True)
    cfg = tiny("t2v")
    save_file(random_state_dict(cfg, seed=3), str(models_dir / "diffusion_models" / DIT))
    save_file(random_state_dict(tiny("t2v", text_dim=768), seed=4), str(models_dir / "diffusion_models" / DIT_768))
    g = torch.Generator().manual_seed(5)
    lora = {}
    for block in range(cfg.num_layers):
        stem = f"diffusion_model.blocks.{block}.self_attn.q"
        lora[stem + ".lora_A.weight"] = torch.randn(4, cfg.dim, generator=g) * 0.2
        lora[stem + ".lora_B.weight"] = torch.randn(cfg.dim, 4, generator=g) * 0.2
    save_file(lora, str(models_dir / "loras" / LORA))
    umt5_cfg = UMT5Config(vocab_size=UMT5_SHAPE["vocab_size"], dim=UMT5_SHAPE["d_model"],
                          dim_attn=UMT5_SHAPE["num_heads"] * UMT5_SHAPE["d_kv"], dim_ffn=UMT5_SHAPE["d_ff"],
                          num_heads=UMT5_SHAPE["num_heads"], num_layers=UMT5_SHAPE["num_layers"])
    sd = assets.seeded_state_dict(lambda: UMT5Encoder(umt5_cfg), 12, assets._demo_draw)
    umt5 = {k: v.to(torch.bfloat16) for k, v in assets._umt5_hf_names(sd).items()}
    umt5["spiece_model"] = torch.frombuffer(bytearray(assets.tiny_spiece_model()), dtype=torch.uint8)
    save_file(umt5, str(models_dir / "text_encoders" / UMT5))


def write_image_to_video_models(models_dir: Path) -> None:
    """The tiny Wan 2.1 I2V DiT (text 4096 wide, for core umT5 conditioning) and the tiny Wan 2.1 VAE."""
    from slipstream.models.wan.config import tiny
    from slipstream.models.wan.demo_assets import tiny_vae_state_dict
    from slipstream.models.wan.dit import random_state_dict

    for sub, name, make in (("diffusion_models", DIT_I2V, lambda: random_state_dict(tiny("i2v"), seed=6)),
                            ("vae", VAE, lambda: tiny_vae_state_dict(13))):
        path = models_dir / sub / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            save_file(make(), str(path))


def _params() -> dict:
    return {"dit_file": DIT, "lora_file": LORA, "umt5_file": UMT5, "umt5_config": UMT5_CONFIG}


@pytest.fixture(scope="module")
def core_result(comfy_inprocess):
    write_models(comfy_inprocess.models_dir)
    out = comfy_inprocess.run(HERE / "scenarios_wan_core.py", "core_model", _params())
    print(out)
    return out


def test_the_core_model_is_comfyuis_wan_with_our_int8_layers(core_result):
    r = core_result
    assert r["host"] == "comfyui" and r["model_class"] == "WAN21"
    assert r["q_layer_class"].endswith("Int8Operations.Linear") and r["q_layer_module"].endswith("host.comfy_quant")
    assert r["kinds"] == {"int8": 2 * 10, "float": r["kinds"]["float"]} and r["kinds"]["float"] > 0
    assert r["head_kind"] == "float" and r["text_embedding_kind"] == "float"


def test_core_modelsampling_and_ksampler_with_core_text(core_result):
    r = core_result
    assert r["shift"] == 5.0 and r["cond_shape"] == [1, 512, 4096]
    assert r["sample_shape"] == [1, 16, 2, 6, 8] and r["sample_finite"]
    assert r["int8_calls"] >= 2 * 20              # two steps, every int8 layer in each forward
    assert r["rel_vs_core_float"] < 0.1, r["rel_vs_core_float"]


def test_block_swap_patch_runs_around_the_swapped_block(core_result):
    r = core_result
    assert r["swap_patches"] == [["double_block", 1]] and r["on_load_callbacks"] == 1
    # cfg 4: cond and uncond go through one batched forward per step; block 1 resident only while it runs
    assert r["swap_runs"] and all(run == [1, [1]] for run in r["swap_runs"]), r["swap_runs"]
    assert r["swap_moves"][0] == r["swap_moves"][1] == len(r["swap_runs"])
    assert r["swap_resident_after"] == []
    assert r["swap_moves_real"] is False           # CPU: load and offload device are one


def test_block_swap_moves_blocks_when_the_devices_differ(core_result):
    s = core_result["real_swap"]
    assert s["moves_real"] and s["parks"] >= 1
    assert s["runs"] == [[0, [0]]] * 2                        # block 0, alone, once per step
    assert s["moved"][:len(s["moved"]) - 4] == ["cpu"] * (len(s["moved"]) - 4)      # parked at load
    assert s["moved"][-4:] == ["cpu:0", "cpu", "cpu:0", "cpu"]                      # in, out per step
    assert s["same_sample"]


def test_core_lora_loader_on_the_core_model(core_result):
    r = core_result
    assert r["core_lora_patches"] == 2 and r["core_lora_keeps_swap"]
    assert r["core_lora_finite"] and r["core_lora_changes_sample"] > 1e-3


def test_loader_lora_and_fp8_storage_carry_over(core_result):
    r = core_result
    assert r["recorded_lora_patches"] == ["diffusion_model.blocks.0.self_attn.q.weight"]   # blocks "0"
    assert r["recorded_lora_strengths"] == [0.7]
    assert r["fp8_kinds"].get("fp8") == 20 and "int8" not in r["fp8_kinds"]
    assert r["fp8_q_dtype"] == "torch.float8_e4m3fn" and r["fp8_head_dtype"] == "torch.float32"


def test_core_text_encoding_feeds_our_sampler(comfy_inprocess):
    write_models(comfy_inprocess.models_dir)
    r = comfy_inprocess.run(HERE / "scenarios_wan_core.py", "core_text_to_our_sampler", _params())
    print(r)
    assert r["host"] == "comfyui" and r["cond_shape"] == [1, 512, 4096]
    assert r["positive_shapes"] == [[r["prompt_tokens"], 4096]] and r["prompt_tokens"] > 1
    assert r["negative_shape"][1] == 4096 and r["embeds_are_the_conditioning"]
    assert r["latent_shape"] == [1, 16, 2, 6, 8] and r["latent_finite"]
    assert r["prompt_changes_video"] > 1e-4


def test_core_wan_image_to_video_conditioning_on_the_core_model(comfy_inprocess):
    write_models(comfy_inprocess.models_dir)
    write_image_to_video_models(comfy_inprocess.models_dir)
    r = comfy_inprocess.run(HERE / "scenarios_wan_core.py", "core_image_to_video",
                            {**_params(), "i2v_file": DIT_I2V, "vae_file": VAE})
    print(r)
    assert r["host"] == "comfyui" and r["model_class"] == "WAN21" and r["image_to_video"]
    assert r["kinds"]["int8"] == 2 * 12 and r["patch_in_channels"] == 36   # I2V blocks add k_img, v_img
    assert r["cond_concat_image"] == [1, 16, 2, 6, 8] and r["cond_concat_mask"] == [1, 1, 2, 6, 8]
    assert r["latent_shape"] == [1, 16, 2, 6, 8]
    # cfg 5: cond and uncond in one batch; 4 mask channels (one per time step of the first latent
    # frame) and 16 image-latent channels go in beside the 16 noise channels
    assert r["c_concat"] and all(shape == [2, 20, 2, 6, 8] for shape in r["c_concat"]), r["c_concat"]
    assert r["seen_channels"] and set(r["seen_channels"]) == {36}, r["seen_channels"]
    assert r["sample_shape"] == [1, 16, 2, 6, 8] and r["sample_finite"]
    assert r["start_image_changes_sample"] > 1e-4


# ----------------------------------------------------------------------------- the HTTP workflow


def _write_tiny_clip_l(models_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("slipstream_it_memory", HERE / "test_comfyui_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_tiny_clip_l(models_dir)
    return module.CLIP_FILE


def test_workflow_wan_loader_to_core_ksampler(comfyui, harness_module):
    write_models(comfyui.models_dir)
    clip_file = _write_tiny_clip_l(comfyui.models_dir)

    def api(strength: float) -> dict:
        return {
            "1": {"class_type": "SlipstreamWanBlockSwap",
                  "inputs": {"blocks_to_swap": 1, "offload_img_emb": False, "offload_txt_emb": False,
                             "use_non_blocking": True, "prefetch_blocks": 1}},
            "2": {"class_type": "SlipstreamWanModelLoader",
                  "inputs": {"model": DIT_768, "base_precision": "fp32", "quantization": "int8_w8a8",
                             "load_device": "offload_device", "block_swap_args": ["1", 0]}},
            "3": {"class_type": "SlipstreamWanToCoreModel", "inputs": {"model": ["2", 0]}},
            "4": {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["3", 0], "lora_name": LORA, "strength_model": strength}},
            "5": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": 5.0}},
            "6": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_file, "type": "stable_diffusion"}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["6", 0]}},
            # a one-key CLIP-L file leaves most weights uninitialised: zeroed, as for an unconditional run
            "8": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["7", 0]}},
            "9": {"class_type": "EmptyHunyuanLatentVideo",
                  "inputs": {"width": 64, "height": 48, "length": 5, "batch_size": 1}},
            "10": {"class_type": "KSampler",
                   "inputs": {"model": ["5", 0], "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                              "scheduler": "simple", "positive": ["8", 0], "negative": ["8", 0],
                              "latent_image": ["9", 0], "denoise": 1.0}},
            "11": {"class_type": "SaveLatent",
                   "inputs": {"samples": ["10", 0], "filename_prefix": f"wan_core/latent_{strength}"}},
        }

    latents = []
    for strength in (0.0, 1.0):
        (path,) = harness_module.output_files(comfyui.run(api(strength)), comfyui.base)
        latents.append(load_file(str(path))["latent_tensor"])
    assert latents[0].shape == (1, 16, 2, 6, 8)
    assert all(torch.isfinite(t).all() for t in latents)
    assert not torch.equal(latents[0], latents[1])            # the core LoRA reached the core MODEL
    assert "Wan to core MODEL: " in comfyui.log_text()


def _example_on_tiny_files(api: dict, clip_file: str) -> dict:
    """The example workflow with the tiny files and a CPU-sized run; every other setting as shipped.

    The tiny CLIP-L file stands in for umT5 (core would build the full 5.7B umT5 from its bundled config),
    with 768-wide text to match DIT_768; it holds one real key and random rest, so both prompts are
    zeroed before the KSampler, as in the workflow above.
    """
    api = json.loads(json.dumps(api))
    by_class = {}
    for node_id, node in api.items():
        by_class.setdefault(node["class_type"], []).append(node_id)
    (loader,) = by_class["SlipstreamWanModelLoader"]
    (swap,) = by_class["SlipstreamWanBlockSwap"]
    (clip,) = by_class["CLIPLoader"]
    (latent,) = by_class["EmptyHunyuanLatentVideo"]
    (ksampler,) = by_class["KSampler"]
    (vae,) = by_class["VAELoader"]
    api[loader]["inputs"]["model"] = DIT_768
    api[swap]["inputs"]["blocks_to_swap"] = 1
    api[clip]["inputs"].update(clip_name=clip_file, type="stable_diffusion")
    api[latent]["inputs"].update(width=64, height=48, length=5)
    api[ksampler]["inputs"]["steps"] = 2
    api[vae]["inputs"]["vae_name"] = VAE
    for name in ("positive", "negative"):
        zero = f"zero_{name}"
        api[zero] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": api[ksampler]["inputs"][name]}}
        api[ksampler]["inputs"][name] = [zero, 0]
    return api


def test_example_workflow_runs_to_a_video(comfyui, harness_module):
    import imageio_ffmpeg

    write_models(comfyui.models_dir)
    clip_file = _write_tiny_clip_l(comfyui.models_dir)
    write_image_to_video_models(comfyui.models_dir)
    shipped = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    classes = sorted(n["class_type"] for n in shipped.values())
    assert "SlipstreamWanToCoreModel" in classes and "KSampler" in classes and "VAEDecode" in classes

    entry = comfyui.run(_example_on_tiny_files(shipped, clip_file), timeout=600)
    videos = [f for f in harness_module.output_files(entry, comfyui.base) if f.suffix == ".mp4"]
    assert len(videos) == 1, entry.get("outputs")
    assert videos[0].is_file() and videos[0].stat().st_size > 0
    reader = imageio_ffmpeg.read_frames(str(videos[0]))
    meta = next(reader)
    frames = sum(1 for _ in reader)
    assert tuple(meta["size"]) == (64, 48) and frames == 5, (meta, frames)
    log = comfyui.log_text()
    assert "Wan to core MODEL: 1 of 2 blocks swapped" in log
    assert f"Wan to core MODEL: {DIT_768} as WAN21, 20 int8 Linear layers" in log   # 10 per block
