"""The small pieces of the Wan 2.1 DiT: norms, the storage-cast Linear, time embedding and 3-D RoPE.

Precision policy (why things are in fp32): the official model keeps the residual stream, the
norms and the AdaLN modulation in fp32 and runs the matmuls in bf16; RoPE angles are computed in
float64. We do the same, so a bf16 model tracks the fp32 one closely and fp8-stored weights only
cost their own rounding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.fp8 import fp8_linear, fp8_matmul_usable
from ..common.layers import RMSNorm as SharedRMSNorm
from ..common.layers import rope_inv_freqs

FP8_MAX = {}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        FP8_MAX[getattr(torch, _name)] = float(torch.finfo(getattr(torch, _name)).max)


def _wide_float(device: torch.device) -> torch.dtype:
    """float64 where the device has it (the official precision), float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def as_weight_scale(scale: torch.Tensor) -> torch.Tensor:
    """A file's weight scale in the shape that broadcasts over an [out, in] weight: a scalar for one
    scale per tensor, [out, 1] for one per row (files store those as [out] or [out, 1])."""
    return scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())


def float_row_chunks(weight: torch.Tensor, source_scale: torch.Tensor | None = None,
                     chunk_bytes: int = 1 << 20) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, fp32 rows) of a weight viewed as [rows, -1], ~chunk_bytes at a time, with an
    optional file scale applied. A chunk may alias the weight: never modify it in place.

    Converting or quantizing through small chunks means no full-size fp32 temporary ever exists,
    which matters while a model is loading: freed large temporaries between the kept tensors
    fragment the heap, and the holes count as resident memory.
    """
    rows = weight.reshape(weight.shape[0] if weight.dim() else 1, -1)
    scale = None if source_scale is None else as_weight_scale(source_scale).to(rows.device, torch.float32)
    step = max(1, chunk_bytes // max(1, 4 * rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].float()
        if scale is not None:
            chunk = chunk * (scale[start:start + step] if scale.dim() else scale)
        yield start, chunk


def dequantize_into(out: torch.Tensor, weight: torch.Tensor, source_scale: torch.Tensor | None) -> torch.Tensor:
    """out[...] = weight · scale, chunk by chunk (out may be on another device or dtype)."""
    flat = out.view(out.shape[0] if out.dim() else 1, -1)
    for start, chunk in float_row_chunks(weight, source_scale):
        flat[start:start + chunk.shape[0]] = chunk
    return out


def quantize_fp8(weight: torch.Tensor, dtype: torch.dtype, per_row: bool = False, out: torch.Tensor | None = None,
                 source_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale) with scale = absmax / fp8 max (scalar, or [out, 1] per row),
    saturating out-of-range values (e4m3fn has no infinity: a plain cast would make them NaN).

    Written into `out` if given; `source_scale` dequantizes a scaled input first. Works through
    row chunks (see `float_row_chunks`).
    """
    limit = FP8_MAX[dtype]
    absmax = torch.cat([chunk.abs().amax(dim=1) for _, chunk in float_row_chunks(weight, source_scale)])
    scale = (absmax[:, None] if per_row else absmax.amax()).div(limit).clamp_min(1e-30)
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    flat = out.view(out.shape[0] if out.dim() else 1, -1)
    for start, chunk in float_row_chunks(weight, source_scale):
        part = scale[start:start + chunk.shape[0]].to(chunk.device) if per_row else scale.to(chunk.device)
        flat[start:start + chunk.shape[0]] = torch.div(chunk, part).clamp_(-limit, limit)
    return out, scale


# Activation dtypes the fp8 matmul path takes (the float outputs `torch._scaled_mm` is fast for).
FAST_FP8_INPUTS = (torch.bfloat16, torch.float16)


class CastLinear(nn.Linear):
    """A Linear that may store its weight narrower (fp8, optionally with a scale) than it computes.

    The weight is upcast to the activation dtype inside forward, one layer at a time, so fp8
    storage halves the weights' memory without an fp8 matmul; after `use_fp8_matmul()` (the
    loader's `_fast` choice) a supporting GPU multiplies in fp8 instead (kernels/fp8.py).
    `dequantize`/`requantize` are the protocol LoRA merging uses for every quantized layer kind
    (this one and int8).
    """

    weight_scale: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight_scale", None)
        self.fp8_matmul = False     # set by use_fp8_matmul()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight as a float tensor of `dtype` (scale applied)."""
        weight = self.weight.to(dtype)
        if self.weight_scale is not None:
            scale = self.weight_scale.to(dtype)
            # scale the fresh upcast copy in place (one pass less over the weight), never the parameter
            weight = weight * scale if weight is self.weight else weight.mul_(scale)
        return weight

    def requantize(self, weight: torch.Tensor) -> None:
        """Store a float weight back in this layer's storage dtype, in place.

        A scaled layer picks a fresh scale (a LoRA can widen the weight's range, and the old scale
        would saturate it); one scale per row if the layer had one per row.
        """
        storage = self.weight.dtype
        with torch.no_grad():
            if self.weight_scale is None:
                if storage in FP8_MAX:
                    weight = weight.clamp(-FP8_MAX[storage], FP8_MAX[storage])
                self.weight.copy_(weight.to(storage))
                return
            per_row = self.weight_scale.numel() > 1
            q, scale = quantize_fp8(weight, storage, per_row=per_row)
            self.weight.copy_(q)
            self.weight_scale = scale.reshape(self.weight_scale.shape).to(self.weight_scale.device)

    def use_fp8_matmul(self) -> bool:
        """Switch this layer to fp8 × fp8 matmul (`fp8_e4m3fn_fast`); False where its storage cannot.

        Needs fp8 storage with one scale for the whole weight (what the loader writes): the
        activations get one dynamic scale per call, and `torch._scaled_mm` takes tensorwise scales.
        """
        scalar_scale = self.weight_scale is None or self.weight_scale.numel() == 1
        self.fp8_matmul = self.weight.dtype in FP8_MAX and scalar_scale
        return self.fp8_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul and x.dtype in FAST_FP8_INPUTS and fp8_matmul_usable(x, self.weight):
            return fp8_linear(x, self.weight, self.weight_scale, self.bias, fast=True)
        weight = self.weight if self.weight.dtype == x.dtype and self.weight_scale is None \
            else self.dequantize(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class RMSNorm(SharedRMSNorm):
    """Wan's q/k norm over the full width (all heads at once), rounded as the official model does:
    the normalised value goes back to the activation dtype before the gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps, rounding="input")


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (Wan's `WanLayerNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32 embedding [cos(t·f_i), sin(t·f_i)], f_i = 10000^(−i/(dim/2)).

    Cos comes first (official order); computed in float64 like the official model.
    """
    if dim % 2:
        raise ValueError(f"time embedding width must be even, got {dim}")
    half = dim // 2
    wide = _wide_float(timestep.device)
    t = timestep.to(wide)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=wide, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_angles(grid: tuple[int, int, int], axes: tuple[int, int, int], device: torch.device,
                theta: float = 10000.0) -> torch.Tensor:
    """[F·H·W, head_dim/2] rotation angles for tokens in (frame, row, column) row-major order.

    Pair j of a head rotates with the frame index for j < axes[0]/2, with the row for the next
    axes[1]/2 pairs and with the column for the last axes[2]/2; every axis counts from 0.
    """
    wide = _wide_float(device)
    per_axis = []
    for size, axis_dim, along in zip(grid, axes, range(3), strict=True):
        pos = torch.arange(size, dtype=wide, device=device)
        ang = torch.outer(pos, rope_inv_freqs(axis_dim, theta, device, wide))   # [size, axis_dim/2]
        shape = [1, 1, 1, axis_dim // 2]
        shape[along] = size
        per_axis.append(ang.view(shape).expand(*grid, axis_dim // 2))
    return torch.cat(per_axis, dim=-1).reshape(grid[0] * grid[1] * grid[2], -1)


def rope_cos_sin(grid: tuple[int, int, int], axes: tuple[int, int, int], device: torch.device,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `rope_angles`, fp32, shaped [1, L, 1, head_dim/2] to broadcast over batch and heads."""
    angles = rope_angles(grid, axes, device)
    return (torch.cos(angles).float()[None, :, None, :], torch.sin(angles).float()[None, :, None, :])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of [B, L, H, D] by the per-token angles, in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    real, imag = xf[..., 0], xf[..., 1]
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
