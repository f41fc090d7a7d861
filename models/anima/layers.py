"""Small building blocks shared by the Anima DiT, its LLM adapter and the Qwen3 text encoder
(the RMS norm and RoPE's frequencies, which Wan uses too, are in models/common/layers.py; the
Linear every family shares is kernels/cast_linear.py).

Weights may be stored in a narrower dtype than the one a forward pass computes in (bf16 or fp8
storage, fp32 training), so every weight is cast to the input's dtype at use — the same contract
ComfyUI's manual-cast operations follow. That keeps one copy of the weights whatever the compute
precision, and lets a trainer pick its dtype without converting the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.layers import rope_inv_freqs


class CastEmbedding(nn.Embedding):
    """nn.Embedding that returns rows in `out_dtype` (the dtype the caller computes in), on the ids'
    device even when the table was left in RAM (ComfyUI's partial loads keep large modules there)."""

    def reset_parameters(self) -> None:
        # Built on the meta device only to be loaded from a file: skip the random fill (its first
        # use on meta costs seconds of torch-internal imports).
        if self.weight.device.type != "meta":
            super().reset_parameters()

    def forward(self, ids: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        out = F.embedding(ids.to(self.weight.device), self.weight).to(ids.device)
        return out if out_dtype is None else out.to(out_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension (the "rotate half" RoPE layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x by angles whose cos/sin already cover the full head dim (halves repeated)."""
    out = x.float() * cos + rotate_half(x.float()) * sin
    return out.to(x.dtype)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angles [len(positions), head_dim // 2] of standard 1-D RoPE with base `theta`."""
    inv_freq = rope_inv_freqs(head_dim, theta, positions.device, torch.float32)
    return positions.float()[:, None] * inv_freq[None, :]


def cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables over the full head dim: the half-dim angles repeated, for rotate_half."""
    full = torch.cat((angles, angles), dim=-1)
    return full.cos(), full.sin()
