"""One attention call for the whole pack, with pluggable backends.

    attention(q, k, v, mask=None, backend="auto", layout="bhsd", causal=False, scale=None)

q/k/v are [B, H, S, D] ("bhsd", the sdpa layout) or [B, S, H, D] ("bshd", the flash-attn layout);
the output has the layout of the input. `mask` is boolean (True = attend) or additive float,
broadcastable to [B, H, Sq, Sk].

Backends are registered in BACKENDS. `auto` picks the best *exact* backend available for the
device, dtype and head size (flash_attn on CUDA fp16/bf16 when installed, else sdpa); the lossy
int8 `sageattn` is used only when asked for. Naming a backend that is not installed raises
AttentionBackendUnavailable naming the package. A backend that cannot take a particular call
(head dim too large, a mask, fp32, CPU tensors) falls back to sdpa for that call and logs the
reason once.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger("slipstream.attention")

LAYOUTS = ("bhsd", "bshd")
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})


class AttentionBackendUnavailable(RuntimeError):
    """The requested attention backend's package is not installed (or cannot run here)."""


# A kernel takes q, k, v in its backend's layout, causal, scale and an optional mask (only passed
# to backends with takes_mask) and returns the same layout.
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, "float | None", "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """What a backend needs and can do; `load` imports its kernel lazily."""

    name: str
    package: str | None            # pip name to install, None for torch built-ins
    module: str | None             # import name checked for availability
    layout: str                    # the layout its kernel wants
    devices: frozenset[str]        # device types it runs on
    dtypes: frozenset[torch.dtype]  # dtypes it takes
    max_head_dim: int
    takes_mask: bool
    exact: bool                    # False for quantized (lossy) kernels; auto never picks those
    load: Callable[[], Kernel] = field(compare=False)

    def unsupported_reason(self, device_type: str, dtype: torch.dtype, head_dim: int, has_mask: bool) -> str | None:
        """Why this backend cannot take a call with these properties, or None if it can."""
        if device_type not in self.devices:
            return f"runs only on {'/'.join(sorted(self.devices))}, not {device_type}"
        if dtype not in self.dtypes:
            return f"takes only {'/'.join(sorted(str(d).removeprefix('torch.') for d in self.dtypes))}, not {str(dtype).removeprefix('torch.')}"
        if head_dim > self.max_head_dim:
            return f"head dim {head_dim} > {self.max_head_dim}"
        if has_mask and not self.takes_mask:
            return "an arbitrary attention mask is not supported"
        return None


def _load_sdpa() -> Kernel:
    def run(q, k, v, causal, scale, mask=None):
        if causal and (mask is not None or q.shape[-2] != k.shape[-2]):
            # sdpa's is_causal aligns top-left; flash-attn (and we) align bottom-right when Sq != Sk.
            sq, sk = q.shape[-2], k.shape[-2]
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            mask = keep if mask is None else (mask & keep if mask.dtype == torch.bool
                                              else mask.masked_fill(~keep, float("-inf")))
            causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return run


def _load_flash_attn() -> Kernel:
    from flash_attn import flash_attn_func

    def run(q, k, v, causal, scale, mask=None):
        return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal)
    return run


def _load_sageattn() -> Kernel:
    from sageattention import sageattn

    def run(q, k, v, causal, scale, mask=None):
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=causal, sm_scale=scale)
    return run


BACKENDS: dict[str, Backend] = {
    "sdpa": Backend("sdpa", None, None, "bhsd", frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
                    frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}), 1 << 30, True, True,
                    _load_sdpa),
    "flash_attn": Backend("flash_attn", "flash-attn", "flash_attn", "bshd", frozenset({"cuda"}), HALF_DTYPES, 256,
                          False, True, _load_flash_attn),
    "sageattn": Backend("sageattn", "sageattention", "sageattention", "bshd", frozenset({"cuda"}), HALF_DTYPES, 128,
                        False, False, _load_sageattn),
}
# `auto` tries these in order and takes the first that is installed and can take the call.
AUTO_ORDER = ("flash_attn", "sdpa")


def is_installed(name: str) -> bool:
    backend = BACKENDS[name]
    if backend.module is None:
        return True
    try:
        return importlib.util.find_spec(backend.module) is not None
    except (ImportError, ValueError):
        return False


def installed_backends() -> set[str]:
    return {name for name in BACKENDS if is_installed(name)}


def backend_choices() -> list[str]:
    """Combo values for node inputs: 'auto' plus every registered backend."""
    return ["auto", *BACKENDS]


def require_backend(name: str) -> None:
    """Raise a clear error now (at load time) if a named backend cannot be used at all."""
    if name == "auto":
        return
    if name not in BACKENDS:
        raise AttentionBackendUnavailable(
            f"Unknown attention backend '{name}'. Valid choices: {', '.join(backend_choices())}.")
    if not is_installed(name):
        pkg = BACKENDS[name].package
        raise AttentionBackendUnavailable(
            f"Attention backend '{name}' needs the '{pkg}' package, which is not installed. "
            f"Install it (pip install {pkg}) or choose 'sdpa' or 'auto'.")


def choose_backend(requested: str, device_type: str, dtype: torch.dtype, head_dim: int,
                   has_mask: bool = False, installed: set[str] | None = None) -> tuple[str, str | None]:
    """Pick the backend for one call: (name, fallback reason or None). Pure given `installed`.

    An explicitly requested backend that is not installed raises; one that is installed but
    cannot take this call yields ('sdpa', reason).
    """
    installed = installed_backends() if installed is None else installed
    if requested == "auto":
        for name in AUTO_ORDER:
            if name in installed and BACKENDS[name].unsupported_reason(device_type, dtype, head_dim, has_mask) is None:
                return name, None
        return "sdpa", None
    if requested not in BACKENDS:
        require_backend(requested)
    if requested not in installed:
        pkg = BACKENDS[requested].package
        raise AttentionBackendUnavailable(
            f"Attention backend '{requested}' needs the '{pkg}' package, which is not installed. "
            f"Install it (pip install {pkg}) or choose 'sdpa' or 'auto'.")
    reason = BACKENDS[requested].unsupported_reason(device_type, dtype, head_dim, has_mask)
    if reason is not None:
        return "sdpa", f"{requested}: {reason}"
    return requested, None


_kernels: dict[str, Kernel] = {}
_logged_fallbacks: set[str] = set()


def _kernel(name: str) -> Kernel:
    if name not in _kernels:
        try:
            _kernels[name] = BACKENDS[name].load()
        except ImportError as exc:
            pkg = BACKENDS[name].package
            raise AttentionBackendUnavailable(
                f"Attention backend '{name}' failed to import ({exc}). Reinstall '{pkg}' for this torch/CUDA, "
                "or choose 'sdpa'.") from exc
    return _kernels[name]


def _to_layout(t: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    return t if src == dst else t.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
              backend: str = "auto", layout: str = "bhsd", causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention through the chosen backend (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    head_dim = q.shape[-1]
    name, reason = choose_backend(backend, q.device.type, q.dtype, head_dim, mask is not None)
    if reason is not None and reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        log.warning("attention falls back to sdpa for some calls (%s)", reason)
    want = BACKENDS[name].layout
    qq, kk, vv = (_to_layout(t, layout, want) for t in (q, k, v))
    out = _kernel(name)(qq, kk, vv, causal, scale, mask)
    return _to_layout(out, want, layout)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                        causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Plain float64 softmax(QK^T)V in the bhsd layout: the yardstick the backends are tested against."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q64 @ k64.transpose(-1, -2)) * scale
    if causal:
        sq, sk = logits.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        logits = logits.masked_fill(~keep, float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return torch.softmax(logits, dim=-1) @ v64
