"""Scaled fp8 weight storage for the layers that stay floating point.

A plain cast to float8_e4m3fn loses the small weights of wide layers: |w| ≈ 1/√K drifts into the
e4m3 subnormal range, so a 8960-wide layer is 2× less accurate cast than scaled (measured on Wan-shaped layers).
Here a weight is stored as fp8(w / s) with one fp32 scale s = absmax / fp8_max — the `float8_*`
layout ComfyUI writes as `weight` + `weight_scale` + `comfy_quant`. Compute upcasts the weight to
the activation dtype one layer at a time; on GPUs with fp8 tensor cores (`torch._scaled_mm`,
compute capability ≥ 8.9) the `fast` mode multiplies in fp8 instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .int8 import encode_comfy_quant
from .precision import device_capability, is_fp8, supports_fp8_matmul

# ComfyUI's `comfy_quant` format name of each fp8 storage dtype.
FP8_FORMAT_OF = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


def fp8_comfy_quant_config(dtype: torch.dtype) -> dict:
    """The per-layer `comfy_quant` JSON ComfyUI reads for a scaled fp8 layer stored in `dtype`."""
    return {"format": FP8_FORMAT_OF[dtype]}


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quantize_scaled_fp8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scalar scale) with scale = absmax / fp8_max (computed in fp32).

    The absmax is taken in the weight's own dtype (exact: no rounding in abs or max), so only the
    quantizing pass below makes an fp32 copy of the weight.
    """
    if not is_fp8(dtype):
        raise ValueError(f"{dtype} is not an fp8 dtype")
    scale = (weight.abs().amax().float() / fp8_max(dtype)).clamp_min(1e-30)
    # e4m3fn has no infinity: out-of-range values would turn into NaN instead of saturating.
    return quantize_fp8_with_scale(weight, scale, dtype), scale


def quantize_fp8_with_scale(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8(weight / scale) on a given scale, saturating (in-place LoRA updates keep the old scale)."""
    limit = fp8_max(dtype)
    return (weight.float() / scale.float()).clamp_(-limit, limit).to(dtype)


def dequantize_scaled_fp8(weight: torch.Tensor, scale: torch.Tensor | None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight: fp8 upcast, multiplied by its scale in fp32 (scale None = plain cast file)."""
    w = weight.to(torch.float32)
    if scale is not None:
        w = w * scale.to(device=w.device, dtype=torch.float32)
    return w.to(dtype)


def fp8_matmul_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `torch._scaled_mm` is both supported and worth it: CUDA with SM ≥ 8.9, /16 shapes."""
    if x.device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    n, k = weight.shape
    return supports_fp8_matmul(device_capability(x.device)) and k % 16 == 0 and n % 16 == 0


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
               fast: bool = False) -> torch.Tensor:
    """y = x · (weight·scale)ᵀ + bias in x's dtype; fp8 × fp8 matmul when `fast` (caller checked support)."""
    if not fast:
        w = dequantize_scaled_fp8(weight, scale, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    limit = fp8_max(weight.dtype)
    x_scale = (x2d.abs().amax().float() / limit).clamp_min(1e-30)
    x8 = (x2d.float() / x_scale).clamp_(-limit, limit).to(weight.dtype)
    w_scale = scale.float() if scale is not None else torch.ones((), device=x.device)
    out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=w_scale.reshape(()),
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Module):
    """A float layer kept in scaled fp8 storage; state dict in ComfyUI's `float8_*` layout."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, fast: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.float().reshape(()), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.fast = fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast and fp8_matmul_usable(x, self.weight)
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, fast)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_scaled_fp8(self.weight, self.weight_scale, dtype)

    def requantize(self, weight: torch.Tensor) -> None:
        """Store a patched float weight with a fresh scale (LoRA merging)."""
        w8, scale = quantize_scaled_fp8(weight, self.weight.dtype)
        self.weight = nn.Parameter(w8.to(self.weight.device), requires_grad=False)
        self.weight_scale = nn.Parameter(scale.to(self.weight.device), requires_grad=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "comfy_quant"] = encode_comfy_quant(fp8_comfy_quant_config(self.weight.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"storage={str(self.weight.dtype).removeprefix('torch.')}, fast={self.fast}"
