"""comfy-kitchen's fused int8 linear, used on CUDA when its CUDA backend is available.

Kitchen's CUDA (and HIP) backend fuses the per-row activation quantization (with ConvRot), the int8 GEMM
(cuBLASLt/CUTLASS, a dedicated M = 1 GEMV) and the rescale epilogue into one call, which beats
our quantize → torch._int_mm → rescale sequence on NVIDIA GPUs. On CPU its eager backend copies
and transposes the weight on every call and is slower than ours, so it is never
used there. The first failing call switches it off for the process with one log line; our own
path is always correct.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("slipstream.int8")

_state: dict[str, object] = {}   # "fn": kitchen's int8_linear | "off": why it is not used


def _kitchen_int8_linear():
    if "fn" in _state or "off" in _state:
        return _state.get("fn")
    try:
        import comfy_kitchen as ck
    except ImportError:
        _state["off"] = "comfy_kitchen is not installed"
        return None
    try:
        backends = ck.list_backends()
    except Exception as exc:  # an old kitchen without the registry API
        _state["off"] = f"comfy_kitchen.list_backends failed: {exc}"
        return None
    usable = [name for name in ("cuda", "hip") if isinstance(backends, dict) and isinstance(backends.get(name), dict)
              and backends[name].get("available") and not backends[name].get("disabled")]
    if not usable or not hasattr(ck, "int8_linear"):
        _state["off"] = "comfy_kitchen has no usable CUDA/HIP backend"
        return None
    _state["fn"] = ck.int8_linear
    return _state["fn"]


def linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
           rotation_group: int, allow_cpu: bool = False) -> torch.Tensor | None:
    """Kitchen's int8 linear (output in x's dtype), or None when it does not apply here."""
    if x.device.type != "cuda" and not allow_cpu:
        return None
    fn = _kitchen_int8_linear()
    if fn is None:
        return None
    try:
        return fn(x, weight, weight_scale.float(), bias, out_dtype=x.dtype, convrot=bool(rotation_group),
                  convrot_groupsize=rotation_group or 256)
    except Exception as exc:
        _state.pop("fn", None)
        _state["off"] = f"{type(exc).__name__}: {exc}"
        log.warning("int8: comfy-kitchen's int8_linear failed (%s); using torch._int_mm instead.",
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return None


def status() -> str:
    return f"off: {_state['off']}" if "off" in _state else ("on" if "fn" in _state else "not checked yet")
