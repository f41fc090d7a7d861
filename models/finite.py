"""Finiteness checks: refuse NaN/inf weights when a file loads, and NaN/inf settings when a node runs.

A checkpoint or LoRA full of NaN (a diverged fp16 training run, a bad conversion) loads without a
word and yields black or NaN video minutes later; a NaN `cfg` sent through the API does the same.
Both are cheap to catch where they enter: one min/max reduction per loaded tensor (NaN and inf both
propagate through it, and it runs at memory speed), one comparison per setting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

# fp8 has no min/max kernels on every device; it is widened to fp16 (which holds every fp8 value) in
# chunks of this many elements so the check never needs a second full-size copy.
_FP8_CHUNK = 1 << 24
_FP8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
        if hasattr(torch, n)}


class BadSettingError(ValueError):
    """A node setting outside what the node can use (e.g. a negative frame count sent through the API)."""


class NonFiniteError(BadSettingError):
    """A weight file or a node input holds NaN or infinity."""


def is_finite_tensor(tensor: torch.Tensor) -> bool:
    """True when every element is finite; integer, bool and empty tensors always are."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return True
    if tensor.is_complex():
        return is_finite_tensor(torch.view_as_real(tensor))
    if tensor.dtype in _FP8:
        flat = tensor.reshape(-1)
        return all(is_finite_tensor(flat[i:i + _FP8_CHUNK].to(torch.float16))
                   for i in range(0, flat.numel(), _FP8_CHUNK))
    low, high = torch.aminmax(tensor.detach())
    return bool(math.isfinite(float(low)) and math.isfinite(float(high)))


def _count(tensor: torch.Tensor) -> str:
    if tensor.dtype in _FP8:
        tensor = tensor.to(torch.float16)
    bad = int((~torch.isfinite(tensor)).sum())
    return f"{bad} of its {tensor.numel()} values"


def check_tensor(key: str, tensor: torch.Tensor, source: str) -> torch.Tensor:
    """Return the tensor, or raise NonFiniteError naming the file and the key."""
    if not is_finite_tensor(tensor):
        raise NonFiniteError(
            f"{source}: tensor '{key}' holds NaN or infinite values ({_count(tensor)}). The file is damaged or "
            "was saved from a model whose training diverged (an fp16 overflow often does this); fetch it again "
            "or use another file.")
    return tensor


def check_state_dict(sd: Mapping[str, torch.Tensor], source: str) -> Mapping[str, torch.Tensor]:
    """Check every tensor of a loaded state dict once; the first bad key is reported."""
    for key, tensor in sd.items():
        if isinstance(tensor, torch.Tensor):
            check_tensor(key, tensor, source)
    return sd


def check_tensors(items: Iterable[tuple[str, torch.Tensor]], source: str) -> Iterable[tuple[str, torch.Tensor]]:
    """Pass (key, tensor) pairs through, checking each as it streams by (for loaders that never hold
    the whole file)."""
    for key, tensor in items:
        yield key, check_tensor(key, tensor, source)


def finite_number(name: str, value: object, node: str = "") -> float:
    """A node's float setting as a float; NonFiniteError naming the input for NaN or infinity.

    ComfyUI's widgets cannot produce NaN, but a prompt sent through the API can, and min/max checks
    let NaN through (every comparison with NaN is false).
    """
    where = f"{node}: " if node else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NonFiniteError(f"{where}'{name}' must be a number, got {type(value).__name__} {value!r}.")
    if not math.isfinite(float(value)):
        raise NonFiniteError(f"{where}'{name}' is {value!r}; it must be a finite number (the widget's default "
                             "is a good start).")
    return float(value)


def finite_input(name: str, tensor: object, node: str = "") -> object:
    """A tensor input (text embeds, a latent) unchanged; NonFiniteError naming the input if it holds
    NaN/inf — it came from an upstream node that already failed, and sampling it only makes NaN frames."""
    if isinstance(tensor, torch.Tensor) and not is_finite_tensor(tensor):
        where = f"{node}: " if node else ""
        raise NonFiniteError(f"{where}'{name}' holds NaN or infinite values ({_count(tensor)}). The node that made "
                             "it went wrong (often an fp16 overflow: try bf16 or fp32 precision there).")
    return tensor
