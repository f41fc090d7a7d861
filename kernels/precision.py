"""Compute precision and storage dtypes.

`auto` is a pure function of the device's compute capability so every case is testable on a
CPU: bf16 on Ampere and newer (capability >= 8.0), fp16 on Volta/Turing (7.x), fp32 on older
GPUs and on CPU. The fp8 storage dtypes need a torch that has them; asking for one on a torch
without them raises an error that says which torch does.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
FP8_STORAGE = ("fp8_e4m3fn", "fp8_e5m2")

_NAMED = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_FP8_ATTR = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


class UnsupportedDtypeError(ValueError):
    """A precision or storage dtype name that this torch or this device cannot provide."""


def auto_dtype(capability: tuple[int, int] | None) -> torch.dtype:
    """bf16 for compute capability >= 8.0, fp16 for 7.x, fp32 below that and for None (CPU/other)."""
    if capability is None:
        return torch.float32
    major = capability[0]
    if major >= 8:
        return torch.bfloat16
    if major == 7:
        return torch.float16
    return torch.float32


def device_capability(device: torch.device | str) -> tuple[int, int] | None:
    """CUDA compute capability of a device, None for anything that is not a CUDA GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """Turn a node's precision choice into a dtype; `auto` looks at the device."""
    key = name.strip().lower()
    if key == "auto":
        return auto_dtype(device_capability(device))
    if key in _NAMED:
        return _NAMED[key]
    raise UnsupportedDtypeError(f"Unknown precision '{name}'. Valid choices: {', '.join(PRECISIONS)}.")


def fp8_dtype(name: str) -> torch.dtype:
    """The torch dtype for an fp8 storage name ('fp8_e4m3fn', 'fp8_e5m2'; a '_fast' suffix is allowed)."""
    key = name.strip().lower().removesuffix("_fast")
    if key not in _FP8_ATTR:
        raise UnsupportedDtypeError(f"Unknown fp8 storage dtype '{name}'. Valid choices: {', '.join(FP8_STORAGE)}.")
    dtype = getattr(torch, _FP8_ATTR[key], None)
    if dtype is None:
        raise UnsupportedDtypeError(
            f"This torch ({torch.__version__}) has no {_FP8_ATTR[key]}; fp8 storage needs torch >= 2.1. "
            "Upgrade torch or choose 'default' weight storage.")
    return dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in {getattr(torch, a) for a in _FP8_ATTR.values() if hasattr(torch, a)}


def supports_fp8_matmul(capability: tuple[int, int] | None) -> bool:
    """fp8 tensor-core matmul (torch._scaled_mm) exists on Ada (8.9) and Hopper (9.0) and newer."""
    return capability is not None and tuple(capability) >= (8, 9)


def fp8_matmul_missing(device: torch.device | str) -> str | None:
    """Why a `_fast` fp8 choice cannot multiply in fp8 on `device` (None when it can).

    Every loader treats `_fast` the same way there: the weights are still stored in fp8 (the memory
    saving stays) and computed in the activation dtype, and the user is told once, in the log and on
    the node, rather than the load failing on a machine the workflow was not written for."""
    capability = device_capability(device)
    if supports_fp8_matmul(capability):
        return None
    device = torch.device(device)
    where = f"this {device.type.upper()} device" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
    return (f"fp8 matmul needs an NVIDIA GPU with compute capability 8.9 or newer (RTX 40xx, H100), not {where}: "
            "the weights stay in fp8 (same memory) and compute in the activation dtype instead")


def dtype_name(dtype: torch.dtype) -> str:
    """Short readable name ('bf16', 'fp8_e4m3fn', ...) for logs and node info strings."""
    for short, full in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        if dtype == full:
            return short
    for short, attr in _FP8_ATTR.items():
        if getattr(torch, attr, None) == dtype:
            return short
    return str(dtype).removeprefix("torch.")
