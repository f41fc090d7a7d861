"""Normalized Attention Guidance: the formula against a per-token float64 loop, the guided text
cross-attention of a real Wan block against an independent einsum reference, and NAG inside sampling
runs (scale 1 is a no-op, batched and two-pass CFG agree, the node's settings and errors)."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from slipstream import NODE_CLASS_MAPPINGS as N
from slipstream.models.wan.denoiser import SamplingExtras
from slipstream.models.wan.nag import BlockNag, NagArgs, nag_blend
from slipstream.models.wan.pipeline import SamplerSettings, WanImageEmbeds, sample_video

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from wan_sampler_fixtures import CPU, tiny_handle, tiny_text

pytestmark = pytest.mark.usefixtures("single_thread")


def _reference_blend(z_pos, z_neg, scale, tau, alpha):
    """NAG per token, written out in float64 loops."""
    out = torch.empty(z_pos.shape, dtype=torch.float64)
    flat_p, flat_n, flat_o = z_pos.double().reshape(-1, z_pos.shape[-1]), z_neg.double().reshape(-1, z_pos.shape[-1]), \
        out.view(-1, z_pos.shape[-1])
    for t in range(flat_p.shape[0]):
        p, n = flat_p[t].tolist(), flat_n[t].tolist()
        guided = [scale * a - (scale - 1) * b for a, b in zip(p, n, strict=True)]
        l1_p, l1_g = sum(abs(a) for a in p), sum(abs(g) for g in guided)
        if l1_g / l1_p > tau:
            guided = [g * tau * l1_p / (l1_g + 1e-7) for g in guided]
        flat_o[t] = torch.tensor([alpha * g + (1 - alpha) * a for g, a in zip(guided, p, strict=True)])
    return out


def test_nag_formula_matches_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    z_pos = torch.randn(2, 6, 16, generator=g)
    z_neg = z_pos + 0.05 * torch.randn(2, 6, 16, generator=g)   # close to z_pos: these tokens are not clipped
    z_neg[:, 3:] = torch.randn(2, 3, 16, generator=g)            # far: clipped at tau
    for scale, tau, alpha in ((11.0, 2.5, 0.25), (3.0, 1.5, 0.6), (1.0, 2.5, 0.25)):
        ours = nag_blend(z_pos, z_neg, scale, tau, alpha)
        ref = _reference_blend(z_pos, z_neg, scale, tau, alpha)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    ratio = (11 * z_pos - 10 * z_neg).abs().sum(-1) / z_pos.abs().sum(-1)
    assert (ratio[:, :3] < 2.5).all() and (ratio[:, 3:] > 2.5).all(), "both branches of the clip are exercised"
    torch.testing.assert_close(nag_blend(z_pos, z_neg, 1.0, 2.5, 0.25), z_pos)


def _rms(x, weight, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _attend_ref(q, k, v, heads):
    """softmax(q kᵀ / √d) v per head, einsum in float64: [B, Lq, C] x [B, Lk, C] -> [B, Lq, C]."""
    b, lq, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d) for t in (q, k, v))
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", qh, kh) / math.sqrt(d), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, vh).reshape(b, lq, c)


def test_guided_cross_attention_of_a_wan_block_matches_an_independent_reference():
    handle = tiny_handle(2)
    dit = handle.dit
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 1, 4, 4, generator=g)
    text = torch.randn(2, 5, dit.config.text_dim, generator=g)
    negative = torch.randn(1, 7, dit.config.text_dim, generator=g)
    with torch.no_grad():
        tokens, inputs = dit.embed(x, torch.tensor([500.0, 500.0]), text)
        pad = torch.zeros(1, dit.config.text_len - 7, dit.config.text_dim)
        nag_ctx = dit.text_embedding(torch.cat([negative, pad], dim=1))
        attn = dit.blocks[0].cross_attn
        hidden = torch.randn(tokens.shape, generator=g)
        plain = attn(hidden, inputs)
        guided = attn(hidden, replace(inputs, nag=BlockNag(nag_ctx, (0,), 11.0, 2.5, 0.25)))

    def lin(layer, t):
        return t.double() @ layer.weight.double().t() + layer.bias.double()

    heads, eps = attn.num_heads, attn.norm_q.eps
    h = hidden.double()
    q = _rms(lin(attn.q, h), attn.norm_q.weight.double(), eps)

    def text_attention(ctx, rows):
        k = _rms(lin(attn.k, ctx.double()), attn.norm_k.weight.double(), eps)
        return _attend_ref(q[rows], k, lin(attn.v, ctx.double()), heads)

    z_pos = text_attention(inputs.context[0:1], slice(0, 1))
    z_neg = text_attention(nag_ctx, slice(0, 1))
    expected_row0 = lin(attn.o, _reference_blend(z_pos, z_neg, 11.0, 2.5, 0.25))
    assert float((guided[0:1].double() - expected_row0).abs().max() / expected_row0.abs().max()) <= 1e-4
    torch.testing.assert_close(guided[1], plain[1])   # the negative branch's row is left alone
    assert float((guided[0] - plain[0]).abs().max()) > 1e-3, "NAG changes the positive row"


# ------------------------------------------------------------------------------ in sampling runs


def _run(handle, cfg, batched, nag):
    settings = SamplerSettings(steps=3, cfg=cfg, seed=4, batched_cfg=batched)
    return sample_video(handle, tiny_text(), WanImageEmbeds(32, 32, 5), settings, device=CPU,
                        extras=SamplingExtras(nag=nag))


def test_nag_in_sampling_runs():
    handle = tiny_handle(2)
    plain = _run(handle, 1.0, "off", None)
    torch.testing.assert_close(_run(handle, 1.0, "off", NagArgs(scale=1.0)), plain, rtol=1e-5, atol=1e-5)
    guided = _run(handle, 1.0, "off", NagArgs())
    assert float((guided - plain).abs().max()) > 1e-3, "NAG steers a cfg-1 run"
    batched, two_pass = _run(handle, 4.0, "on", NagArgs()), _run(handle, 4.0, "off", NagArgs())
    torch.testing.assert_close(batched, two_pass, rtol=1e-4, atol=1e-4)
    assert float((batched - _run(handle, 4.0, "on", None)).abs().max()) > 1e-3
    other = NagArgs(negative=torch.randn(4, tiny_text().negative.shape[1]))
    assert float((_run(handle, 1.0, "off", other) - guided).abs().max()) > 1e-4, "its own negative prompt"


def test_nag_node_builds_the_settings_and_refuses_bad_ones():
    node = N["SlipstreamWanNagOptions"]()
    (args,) = node.make(11.0, 2.5, 0.25)
    assert (args.scale, args.tau, args.alpha, args.negative) == (11.0, 2.5, 0.25, None)
    (args,) = node.make(5.0, 2.0, 0.5, nag_text_embeds=tiny_text())
    assert torch.equal(args.negative, tiny_text().negative)
    with pytest.raises(ValueError, match="holds no negative prompt"):
        node.make(5.0, 2.0, 0.5, nag_text_embeds=replace(tiny_text(), negative=None))
    for kwargs, message in ((dict(scale=0.5), "nag_scale must be"), (dict(tau=math.nan), "nag_tau must be"),
                            (dict(alpha=1.5), "nag_alpha blends")):
        with pytest.raises(ValueError, match=message):
            NagArgs(**kwargs)
