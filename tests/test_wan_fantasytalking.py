"""FantasyTalking on the Wan DiT: the whole forward with audio against an independent float64 reference
written from the official formulas (projection, windows with the first-window rule and padding, per-frame
audio attention with k_lens, audio_scale), the no-audio branch, the real file's key names at full size on
`meta`, and bad input."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from fantasytalking_fixtures import nested, random_fantasytalking
from slipstream.models.wan import config as wc
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.fantasytalking import (
    FantasyTalkingAdapter,
    FantasyTalkingConditioning,
    audio_windows,
)

CFG = wc.tiny("i2v", text_dim=64, clip_dim=96)


# ------------------------------------------------------------------------------------ reference
def official_split(length: int, num_frames: int, first_frame: int = 0, latent: int | None = None,
                   expand: int = 4) -> list[tuple[int, int, int]]:
    """(valid start, valid end, padded width) per latent frame, step by step as the official
    split_audio_sequence + split_tensor_with_padding do it (`num_frames` video frames spanned by the
    `length` tokens; a clip of `latent` latent frames whose first frame is video frame `first_frame`)."""
    tokens_per_frame = length / num_frames
    half = int(tokens_per_frame * 4 / 2)
    s = first_frame
    latent = int((num_frames - 1) / 4) + 1 if latent is None else latent
    centres = [0]
    for i in range(1, max(latent, 2)):
        start_token = tokens_per_frame * (s + (i - 1) * 4 + 1)
        end_token = tokens_per_frame * (s + i * 4 + 1)
        centres.append(int((start_token + end_token) / 2) - 1)
    ranges = [[c - half, c + half] for c in centres]
    ranges[0] = [-(half * 2 - ranges[1][0]), ranges[1][0]]
    out = []
    for start, end in ranges[:latent]:
        start, end = start - expand, end + expand
        pad_front, pad_back = max(-start, 0), max(end - (length - 1), 0)
        valid_start, valid_end = max(start, 0), min(end, length - 1)
        valid = valid_end - valid_start + 1 if valid_start <= valid_end else 0
        out.append((valid_start, valid_start + valid - 1, valid + pad_front + pad_back))
    return out


def reference_forward(sd, ft, cfg, x, t, context, clip_fea, y, features, num_frames, audio_scale, first_frame=0,
                      total_frames=None):
    """The official I2V forward with FantasyTalking's processor, float64, loops over latent frames."""
    p = {k: v.double() for k, v in sd.items()}
    a = {k: v.double() for k, v in ft.items()}
    nh, d = cfg.num_heads, cfg.head_dim

    def lin(name, v, params=p):
        return F.linear(v, params[name + ".weight"], params.get(name + ".bias"))

    def rms(name, v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * p[name + ".weight"]

    def ln(v, w=None, b=None, eps=1e-6):
        return F.layer_norm(v, (v.shape[-1],), w, b, eps)

    def sdpa(q, k, v):                         # q [Lq, H, D], k/v [Lk, H, D]
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(q.shape[0], -1)

    # audio: projection, windows of valid tokens (padding never attended: k_lens)
    audio = ln(lin("proj_model.proj", features.double()[0], a), a["proj_model.norm.weight"],
               a["proj_model.norm.bias"], 1e-5)
    windows = official_split(audio.shape[0], total_frames or num_frames, first_frame, (num_frames - 1) // 4 + 1)

    xin = torch.cat([x.double(), y.double()], 1)
    xe = F.conv3d(xin, p["patch_embedding.weight"], p["patch_embedding.bias"], stride=cfg.patch_size)
    f, h, w = xe.shape[2:]
    tok = xe.flatten(2).transpose(1, 2)[0]
    half = cfg.freq_dim // 2
    ang = t.double()[0] * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    e = lin("time_embedding.2", F.silu(lin("time_embedding.0", torch.cat([ang.cos(), ang.sin()]))))
    e0 = lin("time_projection.1", F.silu(e)).view(6, -1)
    ctx = torch.cat([context.double()[0], torch.zeros(512 - context.shape[1], context.shape[2], dtype=torch.float64)])
    ctx = lin("text_embedding.2", F.gelu(lin("text_embedding.0", ctx), approximate="tanh"))
    ci = ln(clip_fea.double()[0], p["img_emb.proj.0.weight"], p["img_emb.proj.0.bias"], 1e-5)
    ci = lin("img_emb.proj.3", F.gelu(lin("img_emb.proj.1", ci)))
    ci = ln(ci, p["img_emb.proj.4.weight"], p["img_emb.proj.4.bias"], 1e-5)

    # complex RoPE over (frame, row, column)
    c = d // 2
    parts = (c - 2 * (c // 3), c // 3, c // 3)
    rot = []
    for fi in range(f):
        for hi in range(h):
            for wi in range(w):
                angles = []
                for pos, n in zip((fi, hi, wi), parts, strict=True):
                    angles += [pos / 10000 ** (2 * j / (2 * n)) for j in range(n)]
                rot.append(angles)
    rot = torch.polar(torch.ones(len(rot), c, dtype=torch.float64), torch.tensor(rot, dtype=torch.float64))

    def rope(v):
        return torch.view_as_real(torch.view_as_complex(v.reshape(v.shape[0], nh, c, 2)) * rot[:, None]).flatten(2)

    per_frame = h * w
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        m = p[b + "modulation"][0] + e0
        hs = ln(tok) * (1 + m[1]) + m[0]
        q = rms(b + "self_attn.norm_q", lin(b + "self_attn.q", hs)).view(-1, nh, d)
        k = rms(b + "self_attn.norm_k", lin(b + "self_attn.k", hs)).view(-1, nh, d)
        tok = tok + lin(b + "self_attn.o", sdpa(rope(q), rope(k), lin(b + "self_attn.v", hs).view(-1, nh, d))) * m[2]
        hs = ln(tok, p[b + "norm3.weight"], p[b + "norm3.bias"])
        q = rms(b + "cross_attn.norm_q", lin(b + "cross_attn.q", hs)).view(-1, nh, d)
        kt = rms(b + "cross_attn.norm_k", lin(b + "cross_attn.k", ctx)).view(-1, nh, d)
        ki = rms(b + "cross_attn.norm_k_img", lin(b + "cross_attn.k_img", ci)).view(-1, nh, d)
        out = sdpa(q, kt, lin(b + "cross_attn.v", ctx).view(-1, nh, d)) + \
            sdpa(q, ki, lin(b + "cross_attn.v_img", ci).view(-1, nh, d))
        audio_x = torch.zeros_like(out)
        for frame, (lo, hi_, _) in enumerate(windows):
            if hi_ < lo:
                continue                                      # no valid token: nothing to attend
            tokens = audio[lo:hi_ + 1]
            ka = lin("audio_processor." + b + "cross_attn.processor.k_proj", tokens, a).view(-1, nh, d)
            va = lin("audio_processor." + b + "cross_attn.processor.v_proj", tokens, a).view(-1, nh, d)
            rows = slice(frame * per_frame, (frame + 1) * per_frame)
            audio_x[rows] = sdpa(q[rows], ka, va)
        tok = tok + lin(b + "cross_attn.o", out + audio_x * audio_scale)
        hs = ln(tok) * (1 + m[4]) + m[3]
        tok = tok + lin(b + "ffn.2", F.gelu(lin(b + "ffn.0", hs), approximate="tanh")) * m[5]
    hm = p["head.modulation"][0] + e
    out = lin("head.head", ln(tok) * (1 + hm[1]) + hm[0])
    out = out.reshape(f, h, w, 1, 2, 2, cfg.out_dim)
    return torch.einsum("fhwpqrc->cfphqwr", out).reshape(1, cfg.out_dim, f, h * 2, w * 2)


def inputs(frames: int, h: int = 4, w: int = 6, batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, frames, h, w, generator=g), torch.full((batch,), 637.0),
            torch.randn(batch, 12, CFG.text_dim, generator=g), torch.randn(batch, 257, CFG.clip_dim, generator=g),
            torch.randn(batch, 20, frames, h, w, generator=g))


def features(length: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(1, length, 768, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def weights():
    return random_state_dict(CFG, seed=3), random_fantasytalking(CFG, seed=4)


def attached(sd, ft, dtype=None) -> WanDiT:
    dit = WanDiT.from_state_dict(sd, dtype=dtype)
    dit.attach_audio(FantasyTalkingAdapter.from_state_dict(nested(ft), dit))
    return dit


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


# ------------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("length,num_frames,first", [(173, 81, 0), (20, 9, 0), (50, 21, 0), (7, 9, 0),
                                                     (100, 33, 8), (60, 17, 5), (40, 5, 0), (30, 1, 0)])
def test_windows_follow_the_official_split(length, num_frames, first):
    total, latent = num_frames + first, (num_frames - 1) // 4 + 1
    starts, lens, width = audio_windows(length, total, first, latent)
    ref = official_split(length, total, first, latent)
    assert [(s, s + n - 1) for s, n in zip(starts.tolist(), lens.tolist(), strict=True)] == [r[:2] for r in ref]
    assert {r[2] for r in ref} == {width}


def test_windows_of_81_frames_worked_by_hand():
    # 173 tokens for 81 frames: 2.1358 tokens per frame, half = 4. Window 1 is centred at
    # int((2.14 + 10.68) / 2) - 1 = 5 -> [1, 9]; window 0 ends there -> [-7, 1]; window 20 is centred at
    # int((164.46 + 173) / 2) - 1 = 167 -> [163, 171]; then 4 more tokens on both sides.
    starts, lens, width = audio_windows(173, 81, 0, 21)
    assert width == 17 and len(starts) == 21
    assert (starts[0].item(), lens[0].item()) == (0, 6)          # [-11, 5]: 11 padded, 6 real
    assert (starts[1].item(), lens[1].item()) == (0, 14)         # [-3, 13]
    assert (starts[-1].item(), starts[-1].item() + lens[-1].item() - 1) == (159, 172)   # [159, 175] cut at 172


# ------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("length,num_frames,scale", [(20, 9, 1.0), (37, 13, 0.7)])
def test_forward_with_audio_matches_the_float64_reference(weights, length, num_frames, scale):
    sd, ft = weights
    dit = attached(sd, ft)
    x, t, ctx, clip, y = inputs((num_frames - 1) // 4 + 1)
    cond = FantasyTalkingConditioning(features(length), num_frames=num_frames, fps=23, audio_scale=scale)
    out = dit(x, t, ctx, clip, y, audio=cond)
    ref = reference_forward(sd, ft, CFG, x, t, ctx, clip, y, cond.features, num_frames, scale)
    assert rel_err(out, ref) <= 1e-4
    plain = reference_forward(sd, ft, CFG, x, t, ctx, clip, y, cond.features, num_frames, 0.0)
    assert rel_err(plain, ref) > 1e-2                     # the audio term is really there


def test_a_slice_of_the_frames_matches_the_reference_on_the_shifted_timeline(weights):
    sd, ft = weights
    dit = attached(sd, ft)
    whole = FantasyTalkingConditioning(features(45), num_frames=21, fps=23, audio_scale=1.3)
    part = whole.frames(8, 9)
    assert (part.first_frame, part.num_frames, part.total_frames) == (8, 9, 21)
    x, t, ctx, clip, y = inputs(3)
    out = dit(x, t, ctx, clip, y, audio=part)
    ref = reference_forward(sd, ft, CFG, x, t, ctx, clip, y, whole.features, 9, 1.3, first_frame=8, total_frames=21)
    assert rel_err(out, ref) <= 1e-4
    assert part.frames(4, 5).first_frame == 12 and whole.frames(0, 21).windows()[0].equal(whole.windows()[0])


def test_batch_of_two_gets_the_same_audio_per_item(weights):
    sd, ft = weights
    dit = attached(sd, ft)
    x, t, ctx, clip, y = inputs(3, batch=2)
    cond = FantasyTalkingConditioning(features(20), num_frames=9)
    out = dit(x, t, ctx, clip, y, audio=cond)
    for i in range(2):
        one = dit(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], clip[i:i + 1], y[i:i + 1], audio=cond)
        torch.testing.assert_close(out[i:i + 1], one, atol=1e-5, rtol=1e-5)


def test_null_branch_and_zero_processors_are_the_plain_dit(weights):
    sd, ft = weights
    plain = WanDiT.from_state_dict(sd)
    x, t, ctx, clip, y = inputs(3)
    base = plain(x, t, ctx, clip, y)
    cond = FantasyTalkingConditioning(features(20), num_frames=9)
    assert torch.equal(attached(sd, ft)(x, t, ctx, clip, y, audio=cond.null()), base)
    assert cond.null().features is cond.features and cond.null().audio_scale == 0.0
    zero = attached(sd, random_fantasytalking(CFG, seed=4, zero=True))   # the official initialisation
    assert torch.equal(zero(x, t, ctx, clip, y, audio=cond), base)


def test_frames_past_the_end_of_the_audio_get_no_audio(weights):
    sd, ft = weights
    dit = attached(sd, ft)
    x, t, ctx, clip, y = inputs(3)
    cond = FantasyTalkingConditioning(features(20), num_frames=9)
    late = cond.frames(40, 9)                          # every window lies past the 20 tokens
    assert late.windows()[1].tolist() == [0, 0, 0]
    assert torch.equal(dit(x, t, ctx, clip, y, audio=late), dit(x, t, ctx, clip, y, audio=cond.null()))


def test_silent_audio_is_conditioning_not_the_null_branch(weights):
    sd, ft = weights
    dit = attached(sd, ft)
    x, t, ctx, clip, y = inputs(3)
    silent = FantasyTalkingConditioning(torch.zeros(1, 20, 768), num_frames=9)
    out = dit(x, t, ctx, clip, y, audio=silent)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, dit(x, t, ctx, clip, y, audio=silent.null()))


def test_bf16_tracks_fp32(weights):
    sd, ft = weights
    x, t, ctx, clip, y = inputs(3)
    cond = FantasyTalkingConditioning(features(20), num_frames=9)
    ref = attached(sd, ft)(x, t, ctx, clip, y, audio=cond)
    out = attached(sd, ft, dtype=torch.bfloat16)(x, t, ctx, clip, y, audio=cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert ((out - ref).abs().mean() / ref.abs().mean()).item() < 0.05


def test_processors_live_in_the_blocks_under_the_official_names(weights):
    sd, ft = weights
    dit = attached(sd, ft)
    keys = dit.state_dict()
    for i in range(CFG.num_layers):
        for kv in ("k", "v"):
            key = f"blocks.{i}.cross_attn.processor.{kv}_proj.weight"
            assert torch.equal(keys[key], ft[f"audio_processor.{key}"])
            assert key in dit.quantizable_keys()            # int8/fp8 storage covers them
    assert torch.equal(dit.audio_adapter.proj_model.proj.weight, ft["proj_model.proj.weight"])
