"""auto precision as a pure function of compute capability; fp8 storage dtypes."""

from __future__ import annotations

import pytest
import torch
from slipstream.kernels import precision as P


@pytest.mark.parametrize("capability,expected", [
    (None, torch.float32), ((3, 7), torch.float32), ((5, 2), torch.float32), ((6, 1), torch.float32),
    ((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
    ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16), ((10, 0), torch.bfloat16), ((12, 0), torch.bfloat16),
])
def test_auto_dtype_by_capability(capability, expected):
    assert P.auto_dtype(capability) == expected


def test_resolve_on_cpu_and_by_name():
    assert P.resolve_dtype("auto", "cpu") == torch.float32
    assert P.resolve_dtype("bf16") == torch.bfloat16
    assert P.resolve_dtype("FP16") == torch.float16
    assert P.resolve_dtype("fp32") == torch.float32
    with pytest.raises(P.UnsupportedDtypeError, match="Valid choices: auto, bf16, fp16, fp32"):
        P.resolve_dtype("fp64")


def test_fp8_storage_dtypes():
    assert P.fp8_dtype("fp8_e4m3fn") == torch.float8_e4m3fn
    assert P.fp8_dtype("fp8_e4m3fn_fast") == torch.float8_e4m3fn
    assert P.fp8_dtype("fp8_e5m2") == torch.float8_e5m2
    assert P.is_fp8(torch.float8_e5m2) and not P.is_fp8(torch.bfloat16)
    with pytest.raises(P.UnsupportedDtypeError, match="Valid choices"):
        P.fp8_dtype("fp8_e3m4")


def test_fp8_on_a_torch_without_it(monkeypatch):
    monkeypatch.delattr(torch, "float8_e5m2")
    with pytest.raises(P.UnsupportedDtypeError, match="has no float8_e5m2; fp8 storage needs torch >= 2.1"):
        P.fp8_dtype("fp8_e5m2")


def test_fp8_matmul_capability():
    assert not P.supports_fp8_matmul(None)
    assert not P.supports_fp8_matmul((8, 6))
    assert P.supports_fp8_matmul((8, 9)) and P.supports_fp8_matmul((9, 0))


def test_dtype_names():
    assert [P.dtype_name(d) for d in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)] == [
        "bf16", "fp16", "fp32", "fp8_e4m3fn"]
