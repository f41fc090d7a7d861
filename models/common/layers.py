"""Layers and tables that several architectures share: the RMS norm and RoPE's frequency ladder.

Each reference implementation rounds its RMS norm differently in half precision, and our models
reproduce their references closely, so the one `RMSNorm` here names the three conventions instead
of each family keeping a near-copy that differs in one line.
"""

from __future__ import annotations

import torch
from torch import nn

# Where the gain is applied, relative to rounding back to a narrow dtype:
#   "fp32":   gain in fp32, one rounding at the end (torch.nn.RMSNorm; Cosmos/Anima, Qwen3)
#   "input":  round the normalised value to the input's dtype, then the gain in that dtype (official Wan)
#   "weight": round the normalised value to the gain's dtype, result in the gain's dtype (T5 / umT5)
ROUNDINGS = ("fp32", "input", "weight")


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · weight over the last dim, normalised in fp32 so half-precision
    activations stay stable; `rounding` picks the reference's convention (see ROUNDINGS)."""

    def __init__(self, dim: int, eps: float = 1e-6, rounding: str = "fp32"):
        super().__init__()
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.eps = eps
        self.rounding = rounding
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.rounding == "fp32":
            return (normed * self.weight.to(device=x.device, dtype=torch.float32)).to(x.dtype)
        if self.rounding == "input":
            return normed.to(x.dtype) * self.weight.to(x.dtype)
        return self.weight * normed.to(self.weight.dtype)


def rope_inv_freqs(dim: int, theta: float = 10000.0, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dim/2 rotation frequencies 1/theta^(2i/dim) of one RoPE axis (or of a whole 1-D RoPE head)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)
