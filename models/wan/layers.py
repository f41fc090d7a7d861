"""The small pieces of the Wan 2.1 DiT: norms, time embedding and 3-D RoPE (its Linear is kernels/cast_linear.py).

Precision policy (why things are in fp32): the official model keeps the residual stream, the
norms and the AdaLN modulation in fp32 and runs the matmuls in bf16; RoPE angles are computed in
float64. We do the same, so a bf16 model tracks the fp32 one closely and fp8-stored weights only
cost their own rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.layers import RMSNorm as SharedRMSNorm
from ..common.layers import rope_inv_freqs


def _wide_float(device: torch.device) -> torch.dtype:
    """float64 where the device has it (the official precision), float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


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
