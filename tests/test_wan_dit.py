"""Wan 2.1 / 2.2 DiT: formulas (time embedding, 3-D RoPE, per-token timesteps), a whole forward of
every variant against an independent float64 reference written from the official formulas, the hooks, and
input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from slipstream.kernels.attention import AttentionBackendUnavailable
from slipstream.models.wan.config import WanDiTConfig
from slipstream.models.wan.config import tiny as full_width_tiny
from slipstream.models.wan.dit import BlockInputs, WanDiT, random_state_dict
from slipstream.models.wan.layers import apply_rope, rope_angles, sinusoidal_embedding


def tiny(model_type: str = "t2v", **kw) -> WanDiTConfig:
    """The tiny config with narrow text/CLIP inputs: the 512-token text path dominates CPU time."""
    return full_width_tiny(model_type, text_dim=64, clip_dim=96, **kw)


def make_inputs(cfg: WanDiTConfig, batch: int = 1, frames: int = 3, h: int = 6, w: int = 8, text: int = 20, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.out_dim, frames, h, w, generator=g)
    t = torch.tensor([999.0, 412.5, 3.0][:batch])
    ctx = torch.randn(batch, text, cfg.text_dim, generator=g)
    if not cfg.has_image_input:
        return x, t, ctx, {}
    y = torch.randn(batch, cfg.cond_channels, frames, h, w, generator=g)
    if not cfg.has_clip:
        return x, t, ctx, {"y": y}
    clip = torch.randn(batch, cfg.clip_tokens, cfg.clip_dim, generator=g)
    return x, t, ctx, {"clip_fea": clip, "y": y}


# ------------------------------------------------------------------------------------ formulas
def test_time_embedding_is_cos_then_sin_of_the_official_frequencies():
    t = torch.tensor([0.0, 1.0, 999.0, 123.456])
    emb = sinusoidal_embedding(t, 8)
    assert emb.shape == (4, 8) and emb.dtype == torch.float32
    for b, tv in enumerate(t.tolist()):
        for i in range(4):
            freq = 10000.0 ** (-i / 4)
            assert emb[b, i].item() == pytest.approx(math.cos(tv * freq), abs=1e-6)
            assert emb[b, 4 + i].item() == pytest.approx(math.sin(tv * freq), abs=1e-6)


def test_rope_angles_follow_the_frame_row_column_split():
    axes = (44, 42, 42)                         # head_dim 128
    grid = (3, 4, 5)
    ang = rope_angles(grid, axes, torch.device("cpu"))
    assert ang.shape == (60, 64)
    for f, h, w in [(0, 0, 0), (2, 3, 4), (1, 0, 3), (2, 1, 0)]:
        token = (f * grid[1] + h) * grid[2] + w          # frame-major row-major order
        expected = [f / 10000 ** (2 * j / 44) for j in range(22)] + \
                   [h / 10000 ** (2 * j / 42) for j in range(21)] + \
                   [w / 10000 ** (2 * j / 42) for j in range(21)]
        assert ang[token].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_apply_rope_rotates_adjacent_pairs_like_complex_multiplication():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 3, 16, generator=g)
    angles = torch.rand(12, 8, generator=g, dtype=torch.float64) * 6
    out = apply_rope(x, torch.cos(angles).float()[None, :, None], torch.sin(angles).float()[None, :, None])
    xc = torch.view_as_complex(x.double().reshape(2, 12, 3, 8, 2))
    expected = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # pair j moves only dims 2j, 2j+1: zero angles leave x untouched
    same = apply_rope(x, torch.ones(1, 12, 1, 8), torch.zeros(1, 12, 1, 8))
    torch.testing.assert_close(same, x)


# ------------------------------------------------------------------------------------ reference
def reference_forward(sd: dict[str, torch.Tensor], cfg: WanDiTConfig, x, t, context, clip_fea=None, y=None,
                      denoise_mask=None, reference=None):
    """The official forward, rewritten from the official code's formulas in float64 with complex RoPE and einsum unpatchify.

    With `denoise_mask` it is Wan 2.2's: token (i, j, k) gets timestep t · mask[0, i, 2j, 2k], and the
    time embedding and every modulation are per token. With `reference` [B, C, H, W] it is the Fun
    reference adapter's: the 2x2 patches of that frame, projected by `ref_conv`, go in front of the
    video's tokens as RoPE frame 0 (the video's frames move to 1..F) and are cut off the output."""
    p = {k: v.double() for k, v in sd.items()}
    dim, nh, d = cfg.dim, cfg.num_heads, cfg.head_dim

    def lin(name, v):
        return F.linear(v, p[name + ".weight"], p[name + ".bias"])

    def rms(name, v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * p[name + ".weight"]

    def ln(v, name=None, eps=1e-6):
        return F.layer_norm(v, (v.shape[-1],), p.get(f"{name}.weight"), p.get(f"{name}.bias"), eps)

    def rope_params(n_dim):
        freqs = torch.outer(torch.arange(1024, dtype=torch.float64),
                            1.0 / torch.pow(10000, torch.arange(0, n_dim, 2, dtype=torch.float64) / n_dim))
        return torch.polar(torch.ones_like(freqs), freqs)

    freqs = torch.cat([rope_params(d - 4 * (d // 6)), rope_params(2 * (d // 6)), rope_params(2 * (d // 6))], 1)
    c = d // 2
    fr = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)

    x = x.double()
    if y is not None:
        x = torch.cat([x, y.double()], dim=1)
    xe = F.conv3d(x, p["patch_embedding.weight"], p["patch_embedding.bias"], stride=cfg.patch_size)
    f, h, w = xe.shape[2:]
    tok = xe.flatten(2).transpose(1, 2)
    n_ref = 0
    if reference is not None:   # patches as an einsum over [B, C, h, 2, w, 2], not a convolution
        r = reference.double().unflatten(2, (h, 2)).unflatten(4, (w, 2))
        r = torch.einsum("bcipjq,dcpq->bijd", r, p["ref_conv.weight"]) + p["ref_conv.bias"]
        tok, n_ref = torch.cat([r.reshape(r.shape[0], h * w, dim), tok], dim=1), h * w
    half = cfg.freq_dim // 2
    tt = t.double()
    if denoise_mask is not None:   # one timestep per token, looped over the latent grid
        tt = torch.stack([torch.stack([t[bi].double() * denoise_mask[min(bi, denoise_mask.shape[0] - 1), 0, i, 2 * j,
                                                                        2 * k].double()
                                       for i in range(f) for j in range(h) for k in range(w)])
                          for bi in range(x.shape[0])])                                    # [B, L]
    sinus = tt.unsqueeze(-1) * torch.pow(10000, -torch.arange(half, dtype=torch.float64) / half)
    emb = torch.cat([torch.cos(sinus), torch.sin(sinus)], dim=-1)
    e = lin("time_embedding.2", F.silu(lin("time_embedding.0", emb)))
    e0 = lin("time_projection.1", F.silu(e)).unflatten(-1, (6, dim))      # [B, 6, dim] or [B, L, 6, dim]

    def mod(bias, ee, n):   # official: (modulation + e).chunk(n) over the 6 (or 2) axis
        if ee.dim() == 4:
            return [u.squeeze(2) for u in (bias.unsqueeze(0) + ee).chunk(n, dim=2)]
        return (bias + ee).chunk(n, dim=1)
    ctx = torch.cat([context.double(), context.new_zeros(context.shape[0], 512 - context.shape[1],
                                                         context.shape[2]).double()], 1)
    ctx = lin("text_embedding.2", F.gelu(lin("text_embedding.0", ctx), approximate="tanh"))
    if clip_fea is not None:
        ci = clip_fea.double()
        if "img_emb.emb_pos" in p:
            ci = ci.reshape(-1, 514, ci.shape[-1]) + p["img_emb.emb_pos"]
        ci = ln(ci, "img_emb.proj.0", 1e-5)
        ci = lin("img_emb.proj.3", F.gelu(lin("img_emb.proj.1", ci)))
        ctx = torch.cat([ln(ci, "img_emb.proj.4", 1e-5), ctx], dim=1)
    fa = f + (1 if n_ref else 0)        # RoPE frames: the reference is frame 0
    mult = torch.cat([fr[0][:fa].view(fa, 1, 1, -1).expand(fa, h, w, -1),
                      fr[1][:h].view(1, h, 1, -1).expand(fa, h, w, -1),
                      fr[2][:w].view(1, 1, w, -1).expand(fa, h, w, -1)], dim=-1).reshape(fa * h * w, 1, -1)
    L = f * h * w

    def rope(v):
        return torch.view_as_real(torch.view_as_complex(v.reshape(*v.shape[:3], -1, 2)) * mult).flatten(3)

    def attn(q, k, v):
        s = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d)
        return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v).flatten(2)

    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        m = mod(p[b + "modulation"], e0, 6)
        hs = ln(tok) * (1 + m[1]) + m[0]
        q = rms(b + "self_attn.norm_q", lin(b + "self_attn.q", hs)).unflatten(-1, (nh, d))
        k = rms(b + "self_attn.norm_k", lin(b + "self_attn.k", hs)).unflatten(-1, (nh, d))
        v = lin(b + "self_attn.v", hs).unflatten(-1, (nh, d))
        tok = tok + lin(b + "self_attn.o", attn(rope(q), rope(k), v)) * m[2]
        hs = ln(tok, b + "norm3")
        img_len = ctx.shape[1] - 512
        ci, ct = ctx[:, :img_len], ctx[:, img_len:]
        q = rms(b + "cross_attn.norm_q", lin(b + "cross_attn.q", hs)).unflatten(-1, (nh, d))
        k = rms(b + "cross_attn.norm_k", lin(b + "cross_attn.k", ct)).unflatten(-1, (nh, d))
        out = attn(q, k, lin(b + "cross_attn.v", ct).unflatten(-1, (nh, d)))
        if img_len:
            ki = rms(b + "cross_attn.norm_k_img", lin(b + "cross_attn.k_img", ci)).unflatten(-1, (nh, d))
            out = out + attn(q, ki, lin(b + "cross_attn.v_img", ci).unflatten(-1, (nh, d)))
        tok = tok + lin(b + "cross_attn.o", out)
        hs = ln(tok) * (1 + m[4]) + m[3]
        tok = tok + lin(b + "ffn.2", F.gelu(lin(b + "ffn.0", hs), approximate="tanh")) * m[5]
    hm = mod(p["head.modulation"], e.unsqueeze(-2), 2)
    out = lin("head.head", ln(tok) * (1 + hm[1]) + hm[0])[:, n_ref:]
    outs = []
    for u in out:
        u = u[:L].reshape(f, h, w, 1, 2, 2, cfg.out_dim)
        outs.append(torch.einsum("fhwpqrc->cfphqwr", u).reshape(cfg.out_dim, f, h * 2, w * 2))
    return torch.stack(outs)


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v", "ti2v"])
def test_forward_matches_the_reference_in_fp32(model_type):
    # One case at the real umT5/CLIP widths, the others narrow to keep the suite fast.
    cfg = full_width_tiny(model_type) if model_type == "i2v" else tiny(model_type)
    sd = random_state_dict(cfg, seed=3)
    model = WanDiT.from_state_dict(sd)
    x, t, ctx, extra = make_inputs(cfg, batch=2)
    out = model(x, t, ctx, **extra)
    assert out.shape == x.shape and out.dtype == torch.float32
    ref = reference_forward(sd, cfg, x, t, ctx, **extra)
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=1e-4)
    assert ref.abs().mean() > 0.1                       # not a degenerate all-zero comparison


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_forward_is_deterministic_and_finite(model_type, dtype):
    cfg = tiny(model_type)
    x, t, ctx, extra = make_inputs(cfg, frames=2, h=4, w=6)
    outs = []
    for _ in range(2):
        model = WanDiT.from_state_dict(random_state_dict(cfg, seed=7), dtype=dtype)
        assert model.compute_dtype == dtype and model.blocks[0].ffn[0].weight.dtype == dtype
        with torch.no_grad():
            outs.append(model(x, t, ctx, **extra))
    assert outs[0].dtype == torch.float32 and outs[0].shape == x.shape
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])
    if dtype == torch.bfloat16:
        ref = WanDiT.from_state_dict(random_state_dict(cfg, seed=7))(x, t, ctx, **extra)
        rel = (outs[0] - ref).norm() / ref.norm()
        assert rel < 0.03


def test_seed_changes_the_weights_and_the_output():
    cfg = tiny()
    x, t, ctx, _ = make_inputs(cfg)
    a = WanDiT.from_state_dict(random_state_dict(cfg, seed=1))(x, t, ctx)
    b = WanDiT.from_state_dict(random_state_dict(cfg, seed=2))(x, t, ctx)
    assert not torch.allclose(a, b)


def test_short_context_is_zero_padded_to_512_and_scalar_timestep_broadcasts():
    cfg = tiny()
    model = WanDiT.from_state_dict(random_state_dict(cfg))
    x, _, ctx, _ = make_inputs(cfg, batch=2, text=7)
    padded = torch.cat([ctx, torch.zeros(2, 505, cfg.text_dim)], dim=1)
    t = torch.tensor(250.0)
    torch.testing.assert_close(model(x, t, ctx), model(x, torch.tensor([250.0, 250.0]), padded))


# ------------------------------------------------------------------------------------ hooks
def test_block_runner_sees_every_block_in_order_and_can_replace_the_call():
    cfg = tiny(num_layers=3)
    model = WanDiT.from_state_dict(random_state_dict(cfg))
    x, t, ctx, _ = make_inputs(cfg)
    seen: list[int] = []

    def runner(index, block, tokens, inputs: BlockInputs):
        assert block is model.blocks[index] and tokens.dtype == torch.float32
        assert inputs.grid == (3, 3, 4) and inputs.e0.shape == (1, 6, cfg.dim)
        seen.append(index)
        return block(tokens, inputs)

    torch.testing.assert_close(model(x, t, ctx, block_runner=runner), model(x, t, ctx))
    assert seen == [0, 1, 2]
    skipped = model(x, t, ctx, block_runner=lambda i, blk, tok, inp: tok if i == 1 else blk(tok, inp))
    assert not torch.allclose(skipped, model(x, t, ctx))


def test_staged_forward_equals_forward():
    cfg = tiny("i2v")
    model = WanDiT.from_state_dict(random_state_dict(cfg))
    x, t, ctx, extra = make_inputs(cfg)
    tokens, inputs = model.embed(x, t, ctx, **extra)
    assert inputs.context.shape == (1, 512, cfg.dim) and inputs.context_img.shape == (1, 257, cfg.dim)
    out = model.unembed(model.forward_blocks(tokens, inputs), inputs)
    torch.testing.assert_close(out, model(x, t, ctx, **extra))


def test_self_attn_scale_gets_q_k_after_rope_and_scales_the_output():
    cfg = tiny(num_layers=2)
    model = WanDiT.from_state_dict(random_state_dict(cfg))
    x, t, ctx, _ = make_inputs(cfg)
    calls = []

    def scale(q, k, grid):
        calls.append((tuple(q.shape), tuple(k.shape), grid))
        return 1.0

    torch.testing.assert_close(model(x, t, ctx, self_attn_scale=scale), model(x, t, ctx))
    assert calls == [((1, 36, 2, 128), (1, 36, 2, 128), (3, 3, 4))] * 2
    assert not torch.allclose(model(x, t, ctx, self_attn_scale=lambda q, k, g: 1.5), model(x, t, ctx))


def test_attention_backend_is_per_model_and_per_call():
    cfg = tiny()
    sd = random_state_dict(cfg)
    x, t, ctx, _ = make_inputs(cfg)
    base = WanDiT.from_state_dict(sd)(x, t, ctx)
    sdpa = WanDiT.from_state_dict(sd, attention_backend="sdpa")
    assert sdpa.attention_backend == "sdpa"
    torch.testing.assert_close(sdpa(x, t, ctx), base)
    torch.testing.assert_close(sdpa(x, t, ctx, attention_backend="auto"), base)
    with pytest.raises(AttentionBackendUnavailable):
        WanDiT.from_state_dict(sd, attention_backend="no_such_backend")


# ------------------------------------------------------------------------------------ errors
def test_bad_inputs_get_clear_errors():
    cfg = tiny("i2v")
    model = WanDiT.from_state_dict(random_state_dict(cfg))
    x, t, ctx, extra = make_inputs(cfg)
    with pytest.raises(ValueError, match="image-to-video.*clip_fea"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, ctx, clip_fea=extra["clip_fea"], y=extra["y"][:, :16])
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(x[..., :5], t, ctx, clip_fea=extra["clip_fea"], y=extra["y"][..., :5])
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, ctx[..., :10], **extra)
    with pytest.raises(ValueError, match="latent"):
        model(x[:, :4], t, ctx, **extra)


def test_cast_linear_fp8_matmul_path(monkeypatch):
    from slipstream.kernels import cast_linear, fp8

    g = torch.Generator().manual_seed(0)
    lin = cast_linear.CastLinear(64, 32)
    with torch.no_grad():
        lin.weight.normal_(generator=g)
        q, scale = fp8.quantize_scaled_fp8(lin.weight.detach(), torch.float8_e4m3fn)
    lin.weight = torch.nn.Parameter(q, requires_grad=False)
    lin.weight_scale = scale
    x = torch.randn(3, 5, 64, generator=g).bfloat16()
    widened = lin(x)
    assert lin.use_fp8_matmul()
    assert torch.equal(lin(x), widened)            # this CPU is no fp8-matmul GPU: the widening path runs
    monkeypatch.setattr(fp8, "fp8_matmul_usable", lambda x, w: True)
    fast = lin(x)                                  # torch's CPU _scaled_mm: the fp8 × fp8 product
    assert fast.dtype == torch.bfloat16 and fast.shape == widened.shape and not torch.equal(fast, widened)
    assert (fast.float() - widened.float()).norm() / widened.float().norm() < 0.08
    assert torch.equal(lin(x.float()), F.linear(x.float(), lin.dequantize(torch.float32), lin.bias))  # fp32: widen
    lin.weight_scale = scale.expand(32, 1).clone()       # per-row scales: _scaled_mm takes tensorwise only
    assert not lin.use_fp8_matmul()
    assert not cast_linear.CastLinear(64, 32).use_fp8_matmul()     # float storage has nothing to multiply in fp8


# ------------------------------------------------------------------------------------ Wan 2.2
def first_frame_mask(frames: int, h: int, w: int, batch: int = 1) -> torch.Tensor:
    """TI2V's mask: the first latent frame is given (0), the rest is noise (1)."""
    mask = torch.ones(batch, 1, frames, h, w)
    mask[:, :, 0] = 0
    return mask


def test_ti2v_per_token_timesteps_match_the_reference_and_keep_the_given_frame_at_t0():
    cfg = tiny("ti2v")
    assert (cfg.in_dim, cfg.out_dim, cfg.cond_channels, cfg.has_clip) == (48, 48, 0, False)
    sd = random_state_dict(cfg, seed=5)
    model = WanDiT.from_state_dict(sd)
    x, t, ctx, _ = make_inputs(cfg, batch=2)
    mask = first_frame_mask(*x.shape[2:])
    out = model(x, t, ctx, denoise_mask=mask)
    ref = reference_forward(sd, cfg, x, t, ctx, denoise_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=1e-4)
    # The mask matters (frame 0 at t=0 differs from the uniform timestep), and an all-ones mask is the plain model.
    plain = model(x, t, ctx)
    assert (out - plain).abs().amax() > 1e-3
    torch.testing.assert_close(model(x, t, ctx, denoise_mask=torch.ones_like(mask)), plain, atol=1e-6, rtol=1e-6)


def test_token_timesteps_sample_the_patch_origin_in_token_order():
    from slipstream.models.wan.dit import token_timesteps

    mask = torch.rand(2, 1, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 20.0])
    got = token_timesteps(t, mask, (1, 2, 2))
    expected = torch.tensor([[t[b] * mask[b, 0, i, 2 * j, 2 * k] for i in range(3) for j in range(2) for k in range(3)]
                             for b in range(2)])
    torch.testing.assert_close(got, expected)


def test_i2v_expert_without_clip_branch_matches_the_reference():
    cfg = tiny("i2v", image_context=False)            # the Wan 2.2 I2V-A14B shape: 36 channels, no img_emb
    sd = random_state_dict(cfg, seed=6)
    assert not any(k.startswith("img_emb") or "k_img" in k for k in sd)
    model = WanDiT.from_state_dict(sd)
    assert model.config.has_image_input and not model.config.has_clip
    x, t, ctx, extra = make_inputs(cfg)
    assert set(extra) == {"y"}
    torch.testing.assert_close(model(x, t, ctx, **extra).double(), reference_forward(sd, cfg, x, t, ctx, **extra),
                               atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="y \\["):
        model(x, t, ctx)


def test_plain_i2v_takes_a_start_and_an_end_image_as_514_clip_tokens():
    cfg = tiny("i2v")
    sd = random_state_dict(cfg, seed=8)
    model = WanDiT.from_state_dict(sd)
    x, t, ctx, extra = make_inputs(cfg)
    two = torch.cat([extra["clip_fea"], torch.randn_like(extra["clip_fea"])], dim=1)      # [1, 514, clip]
    out = model(x, t, ctx, clip_fea=two, y=extra["y"])
    torch.testing.assert_close(out.double(), reference_forward(sd, cfg, x, t, ctx, clip_fea=two, y=extra["y"]),
                               atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="257 or 514"):
        model(x, t, ctx, clip_fea=two[:, :300], y=extra["y"])


def test_bad_denoise_mask_is_explained():
    cfg = tiny("ti2v")
    model = WanDiT.from_state_dict(random_state_dict(cfg))
    x, t, ctx, _ = make_inputs(cfg)
    with pytest.raises(ValueError, match="denoise_mask"):
        model(x, t, ctx, denoise_mask=torch.ones(1, 1, 2, 6, 8))
