"""Wan VACE: detection of the released layouts, the forward against an independent float64
reference written from the official formulas (hints computed up front, as the official model
does), chaining, the context builder, and input errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan.config import WAN21_VACE_1_3B, WAN21_VACE_14B, detect_config, strip_dit_prefix
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.vace import (
    WanVaceDiT,
    build_context,
    mask_to_latent,
    split_by_mask,
    tiny_vace,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def small():
    # A 16-token text context (instead of 512) keeps each forward at a few milliseconds.
    return replace(tiny_vace(num_layers=4, vace_blocks=2, text_dim=64), text_len=16)


def build(cfg, sd):
    """The model of `cfg` with these weights (from_state_dict would read text_len 512 back)."""
    model = WanDiT.build_meta(cfg).to_empty(device="cpu").requires_grad_(False)
    model.load_state_dict(sd)
    return model


def make_inputs(cfg, batch=2, frames=3, h=4, w=6, text=10, contexts=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    t = torch.tensor([999.0, 250.0][:batch])
    ctx = torch.randn(batch, text, cfg.text_dim, generator=g)
    vace = [torch.randn(batch, cfg.vace_in_dim, frames, h, w, generator=g) for _ in range(contexts)]
    return x, t, ctx, vace


# ------------------------------------------------------------------------------------ float64 reference
def reference_vace_forward(sd, cfg, x, t, context, vace_context, strengths):
    """VaceWanModel.forward in float64: every hint first (before_proj + x0, VACE blocks, after_proj),
    then the main blocks with hint[block_id] · context_scale added after block vace_layers[block_id]."""
    p = {k: v.double() for k, v in sd.items()}
    dim, nh, d = cfg.dim, cfg.num_heads, cfg.head_dim

    def lin(name, v):
        return F.linear(v, p[name + ".weight"], p[name + ".bias"])

    def rms(name, v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * p[name + ".weight"]

    def ln(v, name=None):
        return F.layer_norm(v, (v.shape[-1],), p.get(f"{name}.weight"), p.get(f"{name}.bias"), 1e-6)

    def embed(weight, v):
        return F.conv3d(v.double(), p[weight + ".weight"], p[weight + ".bias"], stride=(1, 2, 2))

    xe = embed("patch_embedding", x)
    f, h, w = xe.shape[2:]
    tok = xe.flatten(2).transpose(1, 2)
    half = cfg.freq_dim // 2
    sinus = torch.outer(t.double(), torch.pow(10000, -torch.arange(half, dtype=torch.float64) / half))
    e = lin("time_embedding.2", F.silu(lin("time_embedding.0", torch.cat([sinus.cos(), sinus.sin()], 1))))
    e0 = lin("time_projection.1", F.silu(e)).unflatten(1, (6, dim))
    ctx = F.pad(context.double(), (0, 0, 0, cfg.text_len - context.shape[1]))
    ctx = lin("text_embedding.2", F.gelu(lin("text_embedding.0", ctx), approximate="tanh"))

    # complex RoPE over (frame, row, column) with the 44/42/42 split of a 128-wide head
    c = d // 2
    parts = [c - 2 * (c // 3), c // 3, c // 3]
    angle = [torch.outer(torch.arange(n, dtype=torch.float64),
                         1.0 / torch.pow(10000, torch.arange(0, 2 * k, 2, dtype=torch.float64) / (2 * k)))
             for n, k in zip((f, h, w), parts, strict=True)]
    grid = torch.cat([angle[0].view(f, 1, 1, -1).expand(f, h, w, -1), angle[1].view(1, h, 1, -1).expand(f, h, w, -1),
                      angle[2].view(1, 1, w, -1).expand(f, h, w, -1)], -1).reshape(f * h * w, 1, -1)
    rot = torch.polar(torch.ones_like(grid), grid)

    def rope(v):
        return torch.view_as_real(torch.view_as_complex(v.reshape(*v.shape[:3], -1, 2)) * rot).flatten(3)

    def attn(q, k, v):
        s = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d)
        return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v).flatten(2)

    def block(b, v):
        m = (p[b + "modulation"] + e0).chunk(6, dim=1)
        hs = ln(v) * (1 + m[1]) + m[0]
        q = rms(b + "self_attn.norm_q", lin(b + "self_attn.q", hs)).unflatten(-1, (nh, d))
        k = rms(b + "self_attn.norm_k", lin(b + "self_attn.k", hs)).unflatten(-1, (nh, d))
        v = v + lin(b + "self_attn.o", attn(rope(q), rope(k), lin(b + "self_attn.v", hs).unflatten(-1, (nh, d)))) * m[2]
        hs = ln(v, b + "norm3")
        q = rms(b + "cross_attn.norm_q", lin(b + "cross_attn.q", hs)).unflatten(-1, (nh, d))
        k = rms(b + "cross_attn.norm_k", lin(b + "cross_attn.k", ctx)).unflatten(-1, (nh, d))
        v = v + lin(b + "cross_attn.o", attn(q, k, lin(b + "cross_attn.v", ctx).unflatten(-1, (nh, d))))
        hs = ln(v) * (1 + m[4]) + m[3]
        return v + lin(b + "ffn.2", F.gelu(lin(b + "ffn.0", hs), approximate="tanh")) * m[5]

    hints_per_input = []
    for vc in vace_context:                              # forward_vace, once per input
        cs = embed("vace_patch_embedding", vc).flatten(2).transpose(1, 2)
        cs = lin("vace_blocks.0.before_proj", cs) + tok
        hints = []
        for n in range(len(cfg.vace_layers)):
            cs = block(f"vace_blocks.{n}.", cs)
            hints.append(lin(f"vace_blocks.{n}.after_proj", cs))
        hints_per_input.append(hints)
    block_id = {layer: n for n, layer in enumerate(cfg.vace_layers)}
    for i in range(cfg.num_layers):
        tok = block(f"blocks.{i}.", tok)
        if i in block_id:
            for hints, scale in zip(hints_per_input, strengths, strict=True):
                tok = tok + hints[block_id[i]] * scale
    hm = (p["head.modulation"] + e.unsqueeze(1)).chunk(2, dim=1)
    out = lin("head.head", ln(tok) * (1 + hm[1]) + hm[0])
    out = out.view(out.shape[0], f, h, w, 1, 2, 2, cfg.out_dim)
    return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(out.shape[0], cfg.out_dim, f, h * 2, w * 2)


def test_forward_matches_the_float64_reference_in_fp32():
    cfg = small()
    sd = random_state_dict(cfg, seed=5)
    model = build(cfg, sd)
    assert isinstance(model, WanVaceDiT)
    x, t, ctx, vace = make_inputs(cfg)
    out = model(x, t, ctx, vace_context=vace, vace_strength=[0.7])
    ref = reference_vace_forward(sd, cfg, x, t, ctx, vace, [0.7])
    rel = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, rel
    plain = model(x, t, ctx)                                       # no VACE input: no hints at all
    assert (plain - out).abs().max() > 1e-2 * ref.abs().max()     # the hints really change the result


def test_two_chained_inputs_each_add_their_own_hints():
    cfg = small()
    sd = random_state_dict(cfg, seed=6)
    model = WanDiT.from_state_dict(sd)              # the loader's path: official keys, 512 text tokens
    assert isinstance(model, WanVaceDiT) and model.config.vace_layers == (0, 2)
    x, t, ctx, vace = make_inputs(cfg, batch=1, contexts=2, seed=4)
    out = model(x, t, ctx, vace_context=vace, vace_strength=[1.0, 0.5])
    ref = reference_vace_forward(sd, model.config, x, t, ctx, vace, [1.0, 0.5])
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    # strength 0 on the second input is the first input alone
    alone = model(x, t, ctx, vace_context=vace[:1], vace_strength=[1.0])
    zeroed = model(x, t, ctx, vace_context=vace, vace_strength=[1.0, 0.0])
    torch.testing.assert_close(zeroed, alone, atol=1e-5, rtol=1e-5)


def test_block_runner_sees_the_main_blocks_only_and_vace_runs_after_its_layer():
    cfg = small()
    model = build(cfg, random_state_dict(cfg, seed=2))
    order = []
    for n, block in enumerate(model.vace_blocks):
        block.register_forward_pre_hook(lambda mod, args, n=n: order.append(f"vace{n}"))

    def runner(index, block, tokens, inputs):
        order.append(index)
        return block(tokens, inputs)

    x, t, ctx, vace = make_inputs(cfg, batch=1, contexts=2)
    model(x, t, ctx, vace_context=vace, vace_strength=[1.0, 1.0], block_runner=runner)
    assert order == [0, "vace0", 1, 2, "vace1", 3]     # one call per VACE block for both inputs


# ------------------------------------------------------------------------------------ detection
@pytest.mark.parametrize("config", [WAN21_VACE_1_3B, WAN21_VACE_14B], ids=lambda c: c.name)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_released_vace_layouts_are_detected_from_shapes(config, prefix):
    shapes = {prefix + k: v for k, v in WanDiT.expected_shapes(config).items()}
    entries, _ = strip_dit_prefix(shapes)
    found = detect_config(entries)
    assert found.name == config.name
    assert found.vace_layers == config.vace_layers and found.vace_in_dim == 96


def test_kijai_scaled_fp8_vace_file_loads_its_vace_blocks_in_fp8(tmp_path):
    from safetensors.torch import save_file

    cfg = small()
    sd = random_state_dict(cfg, seed=1)
    fp8 = {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.dim() == 2 and key.startswith(("blocks.", "vace_blocks.")):
            scale = value.abs().amax() / 448.0
            fp8[key] = (value / scale).to(torch.float8_e4m3fn)
            fp8[key[:-len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            fp8[key] = value
    fp8["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path = tmp_path / "vace_fp8_scaled.safetensors"
    save_file(fp8, str(path))
    model = WanDiT.from_file(str(path), dtype=torch.float32)
    assert isinstance(model, WanVaceDiT)
    assert model.vace_blocks[1].after_proj.weight.dtype == torch.float8_e4m3fn
    x, t, ctx, vace = make_inputs(cfg, batch=1)
    out = model(x, t, ctx, vace_context=vace)
    ref = WanDiT.from_state_dict(sd)(x, t, ctx, vace_context=vace)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.1     # fp8 rounding, same model


def test_vace_module_only_file_is_named_with_what_to_load():
    shapes = {k: v for k, v in WanDiT.expected_shapes(small()).items() if k.startswith("vace_")}
    with pytest.raises(CheckpointError, match="only the VACE blocks.*full VACE checkpoint"):
        strip_dit_prefix(shapes, "Wan2_1-VACE_module_14B.safetensors")


def test_vace_layers_stored_in_the_metadata_win_over_the_even_spacing():
    shapes = dict(WanDiT.expected_shapes(small()))
    config = detect_config(shapes, {"config": json.dumps({"vace_layers": [0, 3], "num_heads": 2})})
    assert config.vace_layers == (0, 3)
    assert detect_config(shapes, {"config": json.dumps({"vace_layers": [0, 1, 2]})}).vace_layers == (0, 2)


def test_vace_blocks_that_cannot_be_placed_are_refused():
    shapes = dict(WanDiT.expected_shapes(small()))
    shapes.update({k.replace("vace_blocks.1.", "vace_blocks.2."): v for k, v in shapes.items()
                   if k.startswith("vace_blocks.1.")})
    with pytest.raises(CheckpointError, match="3 VACE blocks for 4 main blocks"):
        detect_config(shapes)


# ------------------------------------------------------------------------------------ context and errors
def test_mask_to_latent_puts_each_cells_pixels_in_channels_and_resamples_frames():
    mask = torch.zeros(5, 16, 24)
    mask[:, 8 + 3, 16 + 5] = 1          # pixel (3, 5) of latent cell (1, 2), every frame
    mask[3] = 0                         # except frame 3
    m = mask_to_latent(mask, 2)
    assert m.shape == (64, 2, 2, 3)
    assert m.sum().item() == 1          # 5 frames -> 2: nearest-exact picks frames floor(0.5·2.5)=1 and floor(1.5·2.5)=3
    assert m[3 * 8 + 5, 0, 1, 2].item() == 1


def test_context_puts_reference_frames_first_with_zero_reactive_half_and_mask():
    video = torch.rand(3, 5, 16, 16) * 2 - 1
    mask = (torch.rand(5, 16, 16) > 0.5).float()
    inactive, reactive = split_by_mask(video, mask)
    torch.testing.assert_close(inactive + reactive, video)
    assert (reactive[:, mask == 0] == 0).all()
    lat_i, lat_r, refs = torch.randn(16, 2, 2, 2), torch.randn(16, 2, 2, 2), torch.randn(16, 1, 2, 2)
    ctx = build_context(lat_i, lat_r, mask, refs)
    assert ctx.shape == (96, 3, 2, 2)
    torch.testing.assert_close(ctx[:16, :1], refs)
    assert (ctx[16:, :1] == 0).all()                       # reactive half and mask of the reference
    torch.testing.assert_close(ctx[:16, 1:], lat_i)
    torch.testing.assert_close(ctx[16:32, 1:], lat_r)


def test_bad_vace_context_shapes_get_clear_errors():
    cfg = small()
    model = build(cfg, random_state_dict(cfg, seed=0))
    x, t, ctx, vace = make_inputs(cfg, batch=1)
    with pytest.raises(ValueError, match=r"vace_context\[0\] must be \[B, 96, F, H, W\]"):
        model(x, t, ctx, vace_context=[vace[0][:, :, :2]])
    with pytest.raises(ValueError, match="2 strengths"):
        model(x, t, ctx, vace_context=vace, vace_strength=[1.0, 1.0])


def test_int8_w8a8_covers_the_vace_blocks():
    from slipstream.models.wan.model_loading import quantize_int8

    cfg = small()
    sd = random_state_dict(cfg, seed=1)
    model, ref = build(cfg, sd), build(cfg, sd)
    quantize_int8(model, torch.device("cpu"))
    assert type(model.vace_blocks[0].before_proj).__name__ == "Int8Linear"
    assert type(model.vace_blocks[1].ffn[0]).__name__ == "Int8Linear"
    x, t, ctx, vace = make_inputs(cfg, batch=1)
    out, want = model(x, t, ctx, vace_context=vace), ref(x, t, ctx, vace_context=vace)
    assert ((out - want).abs().max() / want.abs().max()).item() < 0.05        # int8 rounding, same model
