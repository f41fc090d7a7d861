"""Attention backends against a float64 reference, and backend selection for every case."""

from __future__ import annotations

import pytest
import torch
from slipstream.kernels import attention as attn
from slipstream.kernels.attention import (
    AttentionBackendUnavailable,
    attention,
    choose_backend,
    reference_attention,
)

ALL = {"sdpa", "flash_attn", "sageattn"}


def _qkv(b=2, h=3, sq=17, sk=23, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(dtype) for s in (sq, sk, sk)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_sdpa_matches_float64_reference(dtype, tol):
    q, k, v = _qkv(dtype=dtype)
    out = attention(q, k, v, backend="sdpa")
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=tol, rtol=tol)


def test_bshd_layout_round_trips():
    q, k, v = _qkv()
    out = attention(*(t.transpose(1, 2) for t in (q, k, v)), layout="bshd")
    torch.testing.assert_close(out.transpose(1, 2).double(), reference_attention(q, k, v), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("sq,sk", [(9, 9), (5, 12)])
def test_causal_is_bottom_right_aligned(sq, sk):
    q, k, v = _qkv(sq=sq, sk=sk)
    ref = reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(attention(q, k, v, causal=True).double(), ref, atol=2e-6, rtol=2e-6)


def test_boolean_and_additive_masks():
    q, k, v = _qkv()
    keep = torch.rand(2, 1, 17, 23, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # every query keeps at least one key
    ref = reference_attention(q, k, v, mask=keep)
    torch.testing.assert_close(attention(q, k, v, mask=keep).double(), ref, atol=2e-6, rtol=2e-6)
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, mask=additive).double(), ref, atol=2e-6, rtol=2e-6)


def test_custom_scale():
    q, k, v = _qkv()
    ref = reference_attention(q, k, v, scale=0.05)
    torch.testing.assert_close(attention(q, k, v, scale=0.05).double(), ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 320])
@pytest.mark.parametrize("installed", [{"sdpa"}, {"sdpa", "flash_attn"}, set(ALL)])
def test_auto_selection_every_case(device, dtype, head_dim, installed):
    name, reason = choose_backend("auto", device, dtype, head_dim, installed=installed)
    flash_fits = device == "cuda" and dtype != torch.float32 and head_dim <= 256 and "flash_attn" in installed
    assert name == ("flash_attn" if flash_fits else "sdpa")
    assert reason is None  # auto never "falls back"; it chooses


def test_auto_never_picks_lossy_sage():
    assert choose_backend("auto", "cuda", torch.float16, 64, installed={"sdpa", "sageattn"}) == ("sdpa", None)


def test_auto_with_mask_avoids_flash():
    assert choose_backend("auto", "cuda", torch.bfloat16, 64, has_mask=True, installed=ALL)[0] == "sdpa"


@pytest.mark.parametrize("requested", ["flash_attn", "sageattn"])
def test_missing_package_raises_naming_it(requested):
    with pytest.raises(AttentionBackendUnavailable, match=attn.BACKENDS[requested].package):
        choose_backend(requested, "cuda", torch.float16, 64, installed={"sdpa"})


def test_unknown_backend_lists_choices():
    with pytest.raises(AttentionBackendUnavailable, match="Valid choices: auto, sdpa"):
        choose_backend("xformers", "cuda", torch.float16, 64, installed=ALL)


@pytest.mark.parametrize("device,dtype,head_dim,mask,fragment", [
    ("cuda", torch.float16, 320, False, "head dim 320 > 256"),
    ("cuda", torch.float16, 64, True, "mask"),
    ("cuda", torch.float32, 64, False, "float32"),
    ("cpu", torch.float16, 64, False, "not cpu"),
])
def test_explicit_backend_falls_back_per_call(device, dtype, head_dim, mask, fragment):
    name, reason = choose_backend("flash_attn", device, dtype, head_dim, has_mask=mask, installed=ALL)
    assert name == "sdpa" and fragment in reason


def test_sage_head_dim_limit():
    assert choose_backend("sageattn", "cuda", torch.bfloat16, 128, installed=ALL) == ("sageattn", None)
    assert choose_backend("sageattn", "cuda", torch.bfloat16, 160, installed=ALL)[0] == "sdpa"


def test_fallback_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(attn, "installed_backends", lambda: set(ALL))
    monkeypatch.setattr(attn, "_logged_fallbacks", set())
    q, k, v = _qkv()
    with caplog.at_level("WARNING", logger="slipstream.attention"):
        for _ in range(3):
            out = attention(q, k, v, backend="flash_attn")  # CPU tensors: flash cannot serve, sdpa does
    assert sum("falls back to sdpa" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=2e-6, rtol=2e-6)


def test_require_backend_reports_missing_package(monkeypatch):
    monkeypatch.setattr(attn, "is_installed", lambda name: name == "sdpa")
    attn.require_backend("sdpa")
    attn.require_backend("auto")
    with pytest.raises(AttentionBackendUnavailable, match="pip install flash-attn"):
        attn.require_backend("flash_attn")


def test_installed_backends_always_has_sdpa():
    assert "sdpa" in attn.installed_backends()
    assert attn.backend_choices()[0] == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(ALL))
def test_gpu_backends_agree_with_reference(name):
    if not attn.is_installed(name):
        pytest.skip(f"{name} not installed")
    q, k, v = (t.cuda() for t in _qkv(d=64, dtype=torch.float16))
    out = attention(q, k, v, backend=name)
    tol = 5e-2 if name == "sageattn" else 5e-3
    torch.testing.assert_close(out.double().cpu(), reference_attention(q, k, v).cpu(), atol=tol, rtol=tol)
