"""The Wan nodes end to end on tiny files with the real key layouts: T2V and I2V through every node,
reproducible seeds, interrupts, core-latent interop, settings nodes and the errors users see."""

from __future__ import annotations

import pytest
import torch
from slipstream import NODE_CLASS_MAPPINGS as N
from slipstream import host
from slipstream.models.wan import demo_assets as assets

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    assets.write_tiny_wan_models(root / "models", root / "input", image_to_video=True)
    return root


@pytest.fixture
def wan_dirs(tiny_models, host_folders):
    host_folders(tiny_models / "models", tiny_models / "input")
    return tiny_models


def _node(node_id):
    cls = N[node_id]
    return getattr(cls(), cls.FUNCTION)


def _text_embeds(prompt="a red fox runs through fresh snow | waves roll onto a quiet beach"):
    (encoder,) = _node("SlipstreamWanTextEncoderLoader")(assets.TEXT_ENCODER, "fp32", "offload_device")
    (embeds,) = _node("SlipstreamWanTextEncode")(encoder, prompt, "blurry", "gpu", True)
    return embeds


def _t2v(seed=3, swap=None, **sampler):
    (model,) = _node("SlipstreamWanModelLoader")(assets.DIT_T2V, "fp32", "disabled", "main_device",
                                                 block_swap_args=swap)
    (empty,) = _node("SlipstreamWanEmptyEmbeds")(64, 48, 9)
    kwargs = dict(steps=2, cfg=5.0, shift=5.0, seed=seed, scheduler="unipc", denoise=1.0, force_offload=True,
                  batched_cfg="auto")
    kwargs.update(sampler)
    latent, _ = _node("SlipstreamWanSampler")(model, empty, _text_embeds(), **kwargs)
    return latent


def test_text_to_video_through_every_node(wan_dirs):
    latent = _t2v()
    assert latent["samples"].shape == (1, 16, 3, 6, 8)
    (vae,) = _node("SlipstreamWanVAELoader")(assets.VAE, "fp32")
    (images,) = _node("SlipstreamWanDecode")(vae, latent, False, 272, 64, True)
    assert images.shape == (9, 48, 64, 3) and images.min() >= 0 and images.max() <= 1
    (tiled,) = _node("SlipstreamWanDecode")(vae, latent, True, 32, 16, True)
    assert tiled.shape == images.shape
    assert torch.equal(_t2v()["samples"], latent["samples"]), "same seed, same video"
    assert not torch.equal(_t2v(seed=4)["samples"], latent["samples"])


def test_encoders_and_decode_report_progress_step_by_step(wan_dirs):
    seen: list[tuple[int, int]] = []
    remove = host.add_progress_hook(lambda value, total: seen.append((value, total)))
    try:
        _text_embeds()
        text = list(seen)
        seen.clear()
        (vae,) = _node("SlipstreamWanVAELoader")(assets.VAE, "fp32")
        latent = {"samples": torch.randn(2, 16, 3, 6, 8)}
        _node("SlipstreamWanDecode")(vae, latent, True, 32, 16, True)    # two items, several tiles each
        decode = list(seen)
    finally:
        remove()
    for updates in (text, decode):
        assert [v for v, _ in updates] == list(range(1, len(updates) + 1)), "one step per update, in order"
        assert updates[-1][1] == len(updates), "the bar ends full, never past it"
    assert len(decode) > 2 * 3, "tiles count as steps"


def test_text_embeds_split_prompts_on_bars(wan_dirs):
    embeds = _text_embeds()
    assert len(embeds.positive) == 2 and embeds.negative is not None
    assert all(p.shape[-1] == 32 and p.shape[0] >= 2 for p in embeds.positive)


def test_block_swap_node_changes_nothing_in_the_result(wan_dirs):
    (swap,) = _node("SlipstreamWanBlockSwap")(1, False, True, True, 1)
    assert torch.equal(_t2v(swap=swap)["samples"], _t2v()["samples"])


def test_interrupt_is_honoured(wan_dirs):
    host.request_interrupt()
    with pytest.raises(host.interrupt_exception_types()):
        _t2v()
    assert _t2v()["samples"].shape[0] == 1, "the next run works"


def test_core_latent_and_settings_nodes(wan_dirs):
    start = {"samples": torch.randn(1, 16, 3, 6, 8)}      # what core Wan nodes hand over: raw latent
    (ctx,) = _node("SlipstreamWanContextOptions")("static_standard", 5, 4, 4, True, "linear")
    (feta,) = _node("SlipstreamWanEnhanceVideo")(2.0, 0.0, 1.0)
    latent = _t2v(denoise=0.6, samples=start, context_options=ctx, feta_args=feta, scheduler="dpm++")
    assert latent["samples"].shape == start["samples"].shape and torch.isfinite(latent["samples"]).all()
    (compile_args,) = _node("SlipstreamWanCompileSettings")("eager", False, "default", False, 64, 128, True)
    assert compile_args.backend == "eager" and compile_args.blocks_only


def test_sizes_are_rounded_with_a_note(wan_dirs, caplog):
    (embeds,) = _node("SlipstreamWanEmptyEmbeds")(70, 40, 10)
    assert (embeds.width, embeds.height, embeds.num_frames) == (64, 48, 9)
    assert "rounded" in caplog.text


def test_clear_errors(wan_dirs):
    with pytest.raises(FileNotFoundError, match="not found in folder 'diffusion_models'"):
        _node("SlipstreamWanModelLoader")("missing.safetensors", "fp32", "disabled", "main_device")
    with pytest.raises(Exception, match="sageattention"):
        _node("SlipstreamWanModelLoader")(assets.DIT_T2V, "fp32", "disabled", "main_device", attention_mode="sageattn")
    assert N["SlipstreamWanDecode"].VALIDATE_INPUTS(64, 64) != True  # noqa: E712
    (vae,) = _node("SlipstreamWanVAELoader")(assets.VAE, "fp32")
    with pytest.raises(ValueError, match="video latent"):
        _node("SlipstreamWanDecode")(vae, {"samples": torch.zeros(1, 4, 8, 8)}, False, 272, 64, True)


def test_fp8_storage_loads_and_samples(wan_dirs):
    (model,) = _node("SlipstreamWanModelLoader")(assets.DIT_T2V, "fp32", "fp8_e4m3fn", "offload_device")
    assert model.dit.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    (empty,) = _node("SlipstreamWanEmptyEmbeds")(64, 48, 5)
    latent, _ = _node("SlipstreamWanSampler")(model, empty, _text_embeds("a cat"), 1, 1.0, 5.0, 0, "euler", 1.0,
                                              True, "auto")
    assert torch.isfinite(latent["samples"]).all()


def test_image_to_video_through_every_node(wan_dirs):
    from PIL import Image

    image = torch.from_numpy(
        __import__("numpy").asarray(Image.open(wan_dirs / "input" / assets.START_IMAGE), dtype="float32") / 255)[None]
    (clip_vision,) = _node("SlipstreamWanClipVisionLoader")(assets.CLIP_VISION, "fp32", "offload_device")
    (clip,) = _node("SlipstreamWanClipVisionEncode")(clip_vision, image, "disabled", 1.0, True)
    (vae,) = _node("SlipstreamWanVAELoader")(assets.VAE, "fp32")
    (embeds,) = _node("SlipstreamWanImageToVideoEncode")(vae, image, 64, 48, 9, 0.0, True, False, clip_embeds=clip)
    assert embeds.y.shape == (20, 3, 6, 8) and torch.equal(embeds.y[:4, 0], torch.ones(4, 6, 8))
    assert embeds.y[:4, 1:].abs().sum() == 0
    (model,) = _node("SlipstreamWanModelLoader")(assets.DIT_I2V, "fp32", "disabled", "main_device")
    latent, _ = _node("SlipstreamWanSampler")(model, embeds, _text_embeds(), 2, 5.0, 3.0, 1, "unipc", 1.0, True,
                                              "auto")
    again = _node("SlipstreamWanSampler")(model, embeds, _text_embeds(), 2, 5.0, 3.0, 1, "unipc", 1.0, True,
                                          "auto")[0]
    assert torch.equal(latent["samples"], again["samples"])
    (images,) = _node("SlipstreamWanDecode")(vae, latent, False, 272, 64, True)
    assert images.shape == (9, 48, 64, 3)


def test_every_wan_node_has_a_help_page():
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "web" / "docs"
    for node_id in (n for n in N if n.startswith("SlipstreamWan")):
        page = docs / f"{node_id}.md"
        assert page.exists(), node_id
        text = page.read_text(encoding="utf-8")
        assert "## Inputs" in text and "## Outputs" in text and "## Errors" in text


def _write_lora(path, rank=4, seed=0):
    """A LoRA in ComfyUI/diffusion-pipe naming on the tiny T2V model's q and ffn.0 of block 0."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, (out_f, in_f) in {"blocks.0.self_attn.q": (256, 256), "blocks.0.ffn.0": (512, 256)}.items():
        sd[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=g)
        sd[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=g)
        sd[f"diffusion_model.{module}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def test_lora_chain_merges_at_load(wan_dirs):
    _write_lora(wan_dirs / "models" / "loras" / "tiny_lora.safetensors")
    (plain,) = _node("SlipstreamWanModelLoader")(assets.DIT_T2V, "fp32", "disabled", "main_device")
    (chain,) = _node("SlipstreamWanLoraSelect")("tiny_lora.safetensors", 0.5)
    (chain,) = _node("SlipstreamWanLoraSelect")("tiny_lora.safetensors", 0.25, prev_lora=chain)
    assert [e.strength for e in chain] == [0.5, 0.25]
    (patched,) = _node("SlipstreamWanModelLoader")(assets.DIT_T2V, "fp32", "disabled", "main_device", lora=chain)
    delta = patched.dit.blocks[0].self_attn.q.weight - plain.dit.blocks[0].self_attn.q.weight
    assert delta.abs().max() > 0
    assert torch.equal(patched.dit.blocks[1].self_attn.q.weight, plain.dit.blocks[1].self_attn.q.weight)
    (skipped,) = _node("SlipstreamWanLoraSelect")("tiny_lora.safetensors", 0.0)
    assert skipped == ()


def test_int8_w8a8_blocks_with_block_swap(wan_dirs):
    (swap,) = _node("SlipstreamWanBlockSwap")(1, False, False, True, 1)
    (model,) = _node("SlipstreamWanModelLoader")(assets.DIT_T2V, "fp32", "int8_w8a8", "main_device",
                                                 block_swap_args=swap)
    assert model.dit.blocks[0].self_attn.q.weight.dtype == torch.int8
    assert model.dit.text_embedding[0].weight.dtype == torch.float32, "embeddings stay float"
    (empty,) = _node("SlipstreamWanEmptyEmbeds")(64, 48, 9)
    latent, _ = _node("SlipstreamWanSampler")(model, empty, _text_embeds(), 2, 5.0, 5.0, 3, "unipc", 1.0, True,
                                              "auto")
    reference = _t2v()["samples"]
    assert torch.isfinite(latent["samples"]).all()
    rel = (latent["samples"] - reference).norm() / reference.norm()
    assert rel < 0.2, f"int8 result strays {rel:.3f} from float"


def test_fp8_fast_falls_back_to_plain_fp8_with_a_notice_where_the_device_cannot(wan_dirs):
    seen = []
    remove = host.add_notice_hook(lambda node, message: seen.append((node, message)))
    try:
        (model,) = _node("SlipstreamWanModelLoader")(assets.DIT_T2V, "fp32", "fp8_e4m3fn_fast", "main_device")
    finally:
        remove()
    ffn = model.dit.blocks[0].ffn[0]
    assert ffn.weight.dtype == torch.float8_e4m3fn and not ffn.fp8_matmul
    assert any("8.9" in message and "fp8_e4m3fn_fast" in message for _, message in seen)


def test_fp8_fast_multiplies_in_fp8_where_the_device_can(wan_dirs, monkeypatch):
    from slipstream.kernels import fp8
    from slipstream.models.wan import model_loading

    calls = []
    real_linear = fp8.fp8_linear

    def spy(x, weight, scale, bias, fast=False):
        calls.append(fast)
        return real_linear(x, weight, scale, bias, fast)

    # This CPU stands in for an fp8-capable GPU: torch's CPU _scaled_mm runs the same fp8 math.
    monkeypatch.setattr(model_loading, "fp8_matmul_missing", lambda device: None)
    monkeypatch.setattr(fp8, "fp8_matmul_usable", lambda x, w: w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0)
    monkeypatch.setattr(fp8, "fp8_linear", spy)
    (model,) = _node("SlipstreamWanModelLoader")(assets.DIT_T2V, "bf16", "fp8_e4m3fn_fast", "main_device")
    ffn = model.dit.blocks[0].ffn[0]
    assert ffn.weight.dtype == torch.float8_e4m3fn and ffn.fp8_matmul
    (empty,) = _node("SlipstreamWanEmptyEmbeds")(64, 48, 5)
    latent, _ = _node("SlipstreamWanSampler")(model, empty, _text_embeds("a cat"), 1, 1.0, 5.0, 0, "euler", 1.0,
                                              True, "auto")
    assert torch.isfinite(latent["samples"]).all() and calls and all(calls)
