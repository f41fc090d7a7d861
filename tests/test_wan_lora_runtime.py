"""Unmerged (run-time) Wan LoRAs: the same result as merging, weights and storage untouched, strength
changes without reading the model file again, block swap, block selection, low-memory mode, and the
errors users see."""

from __future__ import annotations

import builtins
import logging
from dataclasses import replace
from functools import lru_cache

import pytest
import torch
from safetensors.torch import save_file
from slipstream import NODE_CLASS_MAPPINGS as N
from slipstream.models.wan.config import tiny
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.lora import LoraError, merge_lora, parse_blocks, parse_lora
from slipstream.models.wan.lora_runtime import ADDITIVE, EXACT, RuntimeLora, attach_chain, attach_lora
from slipstream.models.wan.pipeline import (
    SamplerSettings,
    SwapSettings,
    WanImageEmbeds,
    WanModelHandle,
    WanTextEmbeds,
    build_host_blocks,
    sample_video,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
          "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@lru_cache(maxsize=1)
def weights() -> dict[str, torch.Tensor]:
    return random_state_dict(tiny("t2v", text_dim=64, clip_dim=96), seed=11)


def dit(**kw) -> WanDiT:
    return WanDiT.from_state_dict({k: v.clone() for k, v in weights().items()}, **kw)


def block_lora(blocks=(0, 1), rank=8, seed=0, scale=0.1) -> dict[str, torch.Tensor]:
    """The usual Wan targets (attention q/k/v/o and FFN) of the given blocks, ComfyUI naming."""
    g = torch.Generator().manual_seed(seed)
    sd = weights()
    lora = {}
    for i in blocks:
        for name in LAYERS:
            out_f, in_f = sd[f"blocks.{i}.{name}.weight"].shape
            lora[f"diffusion_model.blocks.{i}.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * scale
            lora[f"diffusion_model.blocks.{i}.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * scale
            lora[f"diffusion_model.blocks.{i}.{name}.alpha"] = torch.tensor(float(rank))
    lora["diffusion_model.blocks.1.diff_m"] = torch.randn(1, 6, 256, generator=g) * 0.05
    lora["diffusion_model.blocks.0.norm3.diff_b"] = torch.randn(256, generator=g) * 0.05
    return lora


def embeds(seed=0) -> tuple[WanTextEmbeds, WanImageEmbeds]:
    g = torch.Generator().manual_seed(seed)
    return WanTextEmbeds((torch.randn(5, 64, generator=g),), torch.randn(3, 64, generator=g)), WanImageEmbeds(64, 48, 9)


SETTINGS = SamplerSettings(steps=3, cfg=5.0, shift=5.0, seed=1, scheduler="euler")


def run(model: WanDiT, chain=(), swap: SwapSettings | None = None) -> torch.Tensor:
    host = None if swap is None else build_host_blocks(model, swap)
    handle = WanModelHandle(model, "tiny", CPU, swap, host, runtime_loras=tuple(chain))
    return sample_video(handle, *embeds(), SETTINGS, device=CPU)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("mode", [EXACT, ADDITIVE])
def test_unmerged_run_equals_the_merged_run_and_leaves_the_weights_alone(mode):
    lora = block_lora()
    model = dit()
    unmerged = run(model, [RuntimeLora("l", parse_lora(lora, model), 1.0, mode=mode)])
    for key, value in weights().items():
        assert torch.equal(model.state_dict()[key], value), f"{key} changed"
    assert not model.blocks[0].self_attn.q._forward_hooks, "hooks left behind after the run"
    assert "forward" not in model.blocks[0].self_attn.q.__dict__, "the layer's own forward is back"
    merge_lora(model, lora, 1.0)
    merged = run(model)
    assert max_rel(unmerged, merged) <= 1e-5
    assert max_rel(run(dit()), merged) > 1e-2, "the LoRA has a visible effect"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_exact_mode_equals_the_merged_run(dtype):
    """Exact mode builds the merged weight (fp32 sum, one rounding per LoRA) inside each layer call, so
    a bf16/fp16 run equals the merged run bit for bit, chains included; additive mode differs from it
    by the compute dtype's rounding of W + ΔW, and stays about as close to the fp32 truth as merging."""
    lora, second = block_lora(), block_lora(seed=5, scale=0.05)
    truth_model = dit()
    merge_lora(truth_model, lora, 1.0)
    truth = run(truth_model)
    model = dit(dtype=dtype)
    exact = run(model, [RuntimeLora("l", parse_lora(lora, model), 1.0)])
    chain = run(model, [RuntimeLora("l", parse_lora(lora, model), 1.0), RuntimeLora("m", parse_lora(second, model), -0.6)])
    additive = run(model, [RuntimeLora("l", parse_lora(lora, model), 1.0, mode=ADDITIVE)])
    merge_lora(model, lora, 1.0)
    merged = run(model)
    assert max_rel(exact, merged) <= 1e-3
    assert torch.equal(exact, merged), "exact mode reproduces the merge's rounding"
    merge_lora(model, second, -0.6)
    assert torch.equal(chain, run(model)), "a chain rounds per LoRA, as merging one after another does"
    # Additive mode rounds x·W and x·ΔW separately, so its error can reach about twice the merged run's
    # (1.3× on AVX512 without native fp16); a wrong delta would be off by the LoRA's effect, > 1e-2.
    assert max_rel(additive, truth) <= 2 * max_rel(merged, truth)
    assert 0 < max_rel(additive, merged) <= 2e-2


@pytest.mark.parametrize("mode", [EXACT, ADDITIVE])
def test_fp8_and_int8_layers_keep_their_storage_and_get_the_exact_lora(mode):
    from slipstream.kernels.quant_layer import QuantPlan, convert_linears

    fp8 = dit(weight_dtype=torch.float8_e4m3fn, dtype=torch.float32)
    int8 = dit()
    convert_linears(int8.blocks, QuantPlan(on_the_fly=True))
    lora = block_lora()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    t, ctx = torch.tensor([600.0]), torch.randn(1, 5, 64, generator=g)
    for model in (fp8, int8):
        layer = model.blocks[0].self_attn.q
        stored = {k: v.clone() for k, v in model.state_dict().items()}
        ptr = layer.weight.data_ptr()
        # reference: the layer's own effective weight + ΔW, in fp32, as a plain float model
        reference = dit()
        reference.load_state_dict({k: v for k, v in weights().items()})
        for name, module in model.named_modules():
            if hasattr(module, "dequantize") and name.startswith("blocks."):
                reference.get_submodule(name).weight.data.copy_(module.dequantize(torch.float32))
        merge_lora(reference, lora, 0.8)
        with torch.no_grad(), attach_lora(model, lora, 0.8, mode=mode):
            out = model(x, t, ctx)
        assert layer.weight.data_ptr() == ptr and layer.weight.dtype in (torch.float8_e4m3fn, torch.int8)
        for key, value in model.state_dict().items():
            assert torch.equal(value, stored[key]), f"{key} changed"
        # fp8 storage widens exactly: the unmerged layer computes W_fp8 + ΔW; exact mode also computes an
        # int8 layer in float from its widened weight
        if model is fp8 or mode == EXACT:
            torch.testing.assert_close(out, reference(x, t, ctx), rtol=1e-4, atol=1e-4)
        else:              # int8 also quantizes activations: the LoRA part is exact, the base part W8A8
            assert max_rel(out, reference(x, t, ctx)) < 0.05


@pytest.mark.parametrize("low_mem", [False, True])
def test_block_swap_streams_only_the_base_weights(low_mem):
    lora = block_lora()
    model = dit()
    chain = [RuntimeLora("l", parse_lora(lora, model), 0.7, low_mem=low_mem)]
    plain = run(model, chain)
    swap = SwapSettings(blocks_to_swap=2, use_non_blocking=False, prefetch_blocks=1)
    host_bytes_without = build_host_blocks(dit(), swap).host_bytes
    swapped_model = dit()
    host = build_host_blocks(swapped_model, swap)
    assert host.host_bytes == host_bytes_without
    handle = WanModelHandle(swapped_model, "tiny", CPU, swap, host, runtime_loras=tuple(chain))
    swapped = sample_video(handle, *embeds(), SETTINGS, device=CPU)
    torch.testing.assert_close(swapped, plain, rtol=1e-5, atol=1e-5)
    assert host.host_bytes == host_bytes_without, "the LoRA went into the swapped buffers"
    merged = dit()
    merge_lora(merged, lora, 0.7)
    assert max_rel(plain, run(merged)) <= 1e-5


def test_block_selection_limits_which_blocks_change():
    lora = block_lora()
    assert parse_blocks(" 0-2, 5,7-7 ") == (0, 1, 2, 5, 7) and parse_blocks("") == ()
    model = dit()
    report = merge_lora(model, lora, 1.0, blocks=(1,))
    assert all(target.startswith("blocks.1.") for target in report.applied)
    assert report.skipped["blocks.0.self_attn.q"] == "block not selected"
    assert torch.equal(model.blocks[0].self_attn.q.weight, weights()["blocks.0.self_attn.q.weight"])
    assert not torch.equal(model.blocks[1].self_attn.q.weight, weights()["blocks.1.self_attn.q.weight"])
    unmerged_model = dit()
    chain = [RuntimeLora("l", parse_lora(lora, unmerged_model), 1.0, blocks=(1,))]
    assert max_rel(run(unmerged_model, chain), run(model)) <= 1e-5
    with pytest.raises(LoraError, match="this model has 2 blocks"):
        attach_chain(unmerged_model, [RuntimeLora("l", chain[0].lora, 1.0, blocks=(1, 5))])
    with pytest.raises(LoraError, match="no layer matched"):
        merge_lora(dit(), {k: v for k, v in lora.items() if ".blocks.0." in k}, 1.0, blocks=(1,))
    with pytest.raises(ValueError, match="not a block number"):
        parse_blocks("first ten")


def test_input_axis_dora_after_another_lora_runs_exact_only():
    model = dit()
    stem = "diffusion_model.blocks.0.self_attn.q"
    g = torch.Generator().manual_seed(8)
    first = {f"{stem}.lora_A.weight": torch.randn(4, 256, generator=g) * 0.1,
             f"{stem}.lora_B.weight": torch.randn(256, 4, generator=g) * 0.1}
    dora = dict(first, **{f"{stem}.dora_scale": torch.rand(1, 256, generator=g) + 0.5})
    chain = [RuntimeLora("a", parse_lora(first, model), 1.0, mode=ADDITIVE),
             RuntimeLora("b", parse_lora(dora, model), 1.0, mode=ADDITIVE)]
    with pytest.raises(LoraError, match="lora_mode 'exact'"):
        attach_chain(model, chain)
    assert not model.blocks[0].self_attn.q._forward_hooks
    exact = run(model, [replace(item, mode=EXACT) for item in chain])
    merge_lora(model, first, 1.0)
    merge_lora(model, dora, 1.0)
    assert max_rel(exact, run(model)) <= 1e-5


# ---------------------------------------------------------------------------------- through the nodes


@pytest.fixture
def lora_dirs(tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "loras").mkdir()
    save_file(weights(), str(models / "diffusion_models" / "tiny_t2v.safetensors"))
    save_file(block_lora(), str(models / "loras" / "style.safetensors"))
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(8, 4)},
              str(models / "loras" / "flux.safetensors"))
    monkeypatch.setenv("SLIPSTREAM_MODELS", str(models))
    monkeypatch.setenv("SLIPSTREAM_OUTPUT", str(tmp_path / "output"))
    monkeypatch.setenv("SLIPSTREAM_TEMP", str(tmp_path / "temp"))
    return models


def _node(node_id):
    cls = N[node_id]
    return getattr(cls(), cls.FUNCTION)


def _sample(model) -> torch.Tensor:
    text, image = embeds()
    latent, _denoised = _node("SlipstreamWanSampler")(model, image, text, 3, 5.0, 5.0, 1, "euler", 1.0, True, "auto")
    return latent["samples"]


def test_strength_change_reruns_without_reading_the_model_file(lora_dirs, monkeypatch):
    """The loader's inputs do not include the LoRA, so ComfyUI keeps its cached model; applying a new
    strength reads only the LoRA file and shares the loaded module."""
    model_file = str(lora_dirs / "diffusion_models" / "tiny_t2v.safetensors")
    reads: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file) == model_file:
            reads.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    (model,) = _node("SlipstreamWanModelLoader")("tiny_t2v.safetensors", "fp32", "disabled", "main_device")
    assert reads, "the spy sees the loader read the model file"
    reads.clear()
    results = {}
    modes = N["SlipstreamWanApplyLora"].INPUT_TYPES()["required"]["lora_mode"][0]
    for mode in modes:
        for strength in (1.0, 0.4):
            (chain,) = _node("SlipstreamWanLoraSelect")("style.safetensors", strength)
            (patched,) = _node("SlipstreamWanApplyLora")(model, chain, False, mode)
            assert patched.dit is model.dit and not model.runtime_loras
            results[mode, strength] = _sample(patched)
    assert reads == [], "a strength change (or a mode change) read the model file again"
    merged = dit()
    merge_lora(merged, block_lora(), 0.4)
    for mode in modes:
        assert max_rel(results[mode, 0.4], run(merged)) <= 1e-4
        assert max_rel(results[mode, 1.0], results[mode, 0.4]) > 1e-3
    assert torch.equal(_sample(model), run(dit())), "the loader's own handle stays LoRA-free"


def test_bf16_model_with_the_lora_applied_equals_the_model_with_it_merged_at_load(lora_dirs):
    (model,) = _node("SlipstreamWanModelLoader")("tiny_t2v.safetensors", "bf16", "disabled", "main_device")
    (chain,) = _node("SlipstreamWanLoraSelect")("style.safetensors", 1.0)
    (patched,) = _node("SlipstreamWanApplyLora")(model, chain, False, "exact (patch weights at run time)")
    unmerged = _sample(patched)
    (merged,) = _node("SlipstreamWanModelLoader")("tiny_t2v.safetensors", "bf16", "disabled", "main_device",
                                                  lora=chain)
    reference = _sample(merged)
    assert max_rel(unmerged, reference) <= 1e-3
    assert torch.equal(unmerged, reference)
    with pytest.raises(ValueError, match="'lora_mode' must be one of"):
        _node("SlipstreamWanApplyLora")(model, chain, False, "merged")


def test_apply_node_errors_and_warnings(lora_dirs, caplog):
    (model,) = _node("SlipstreamWanModelLoader")("tiny_t2v.safetensors", "fp32", "disabled", "main_device")
    (flux,) = _node("SlipstreamWanLoraSelect")("flux.safetensors", 1.0)
    with pytest.raises(LoraError, match="no layer matched.*made for this"):
        _node("SlipstreamWanApplyLora")(model, flux, False)
    (wide,) = _node("SlipstreamWanLoraSelect")("style.safetensors", 1.0, blocks="0-30")
    with pytest.raises(LoraError, match="this model has 2 blocks"):
        _node("SlipstreamWanApplyLora")(model, wide, False)
    with pytest.raises(ValueError, match="not a block number"):
        _node("SlipstreamWanLoraSelect")("style.safetensors", 1.0, blocks="all")
    (chain,) = _node("SlipstreamWanLoraSelect")("flux.safetensors", 1.0)
    (chain,) = _node("SlipstreamWanLoraSelect")("style.safetensors", 0.5, prev_lora=chain, blocks="1")
    with pytest.raises(LoraError):   # the flux LoRA still matches nothing, even in a chain
        _node("SlipstreamWanApplyLora")(model, chain, False)
    (partial,) = _node("SlipstreamWanLoraSelect")("style.safetensors", 0.5, blocks="1")
    with caplog.at_level(logging.WARNING, logger="slipstream.wan"):
        (patched,) = _node("SlipstreamWanApplyLora")(model, partial, True)
    assert "block not selected" in caplog.text and "block selection" in caplog.text
    assert patched.runtime_loras[0].low_mem and patched.runtime_loras[0].blocks == (1,)


@pytest.mark.parametrize("mode", [EXACT, ADDITIVE])
def test_compiled_blocks_see_the_lora_and_lose_it_after_the_run(mode):
    """Hooks attached after compiling: compiled code must re-check them, not replay a LoRA-free graph."""
    from slipstream.models.wan.pipeline import CompileSettings, apply_compile

    lora = {k: v for k, v in block_lora().items() if ".blocks.0." in k}
    model = dit()
    g = torch.Generator().manual_seed(4)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([600.0]), torch.randn(1, 5, 64, generator=g)
    with torch.no_grad():
        with attach_lora(model, lora, 1.0, mode=mode):
            eager = model(x, t, ctx)
        apply_compile(model, CompileSettings(backend="eager"))
        base = model(x, t, ctx)
        with attach_lora(model, lora, 1.0, mode=mode):
            compiled = model(x, t, ctx)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        assert torch.equal(model(x, t, ctx), base)


def test_the_sampler_makes_room_for_run_time_lora_tensors():
    from slipstream.nodes.wan import _resident_bytes

    model = dit()
    lora = parse_lora(block_lora(), model)
    bare = _resident_bytes(WanModelHandle(model, "tiny", CPU, None, None))
    lora_bytes = sum(4 * t.numel() for t in block_lora().values() if t.dim() > 0)
    largest = max(m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features"))
    exact = _resident_bytes(WanModelHandle(model, "tiny", CPU, None, None, runtime_loras=(RuntimeLora("l", lora, 1.0),)))
    additive = _resident_bytes(WanModelHandle(model, "tiny", CPU, None, None,
                                              runtime_loras=(RuntimeLora("l", lora, 1.0, mode=ADDITIVE),)))
    in_ram = _resident_bytes(WanModelHandle(model, "tiny", CPU, None, None,
                                            runtime_loras=(RuntimeLora("l", lora, 1.0, low_mem=True, mode=ADDITIVE),)))
    assert additive - bare == lora_bytes
    assert exact - bare == lora_bytes + 10 * largest
    assert in_ram == bare
