"""FETA / Enhance-A-Video: strengthen cross-frame attention by a per-layer scalar.

For a self-attention layer with q, k of shape [B, S = F·h·w, N heads, C] (tokens frame-major, as
Wan flattens (f, h, w)), the temporal attention of every spatial position and head is
A = softmax(q_t·k_tᵀ / √C) over the F frames; the cross-frame intensity is the mean of A's
off-diagonal entries, averaged over positions and heads (per batch item); the layer's output is
multiplied by
clamp(intensity · (F + weight), min=1). Weight 0 is the identity here (we skip the layer), so a
disabled FETA can never change a result.

`FetaPatch` attaches this to a Wan DiT without touching its code: forward hooks capture q and k at
the outputs of each block's `self_attn.norm_q` / `norm_k` (after the q/k RMSNorm, before RoPE) and
scale the output of `self_attn`. The pipeline sets the frame count and the enable window per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..finite import finite_number


@dataclass(frozen=True)
class FetaArgs:
    weight: float = 2.0
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self) -> None:
        for name in ("weight", "start_percent", "end_percent"):
            finite_number(name, getattr(self, name), "Wan Enhance-A-Video")

    def active_at(self, step: int, steps: int) -> bool:
        """On for steps whose fraction idx/steps lies in [start_percent, end_percent]."""
        pct = step / max(steps, 1)
        return self.weight != 0.0 and self.start_percent <= pct <= self.end_percent


@torch.compiler.disable
def enhance_score(q: torch.Tensor, k: torch.Tensor, num_frames: int, weight: float) -> torch.Tensor:
    """The factor that multiplies a self-attention output, one per batch item ([B]).

    q, k: [B, F·S, N, C]. The official formula averages over positions and heads of its single
    sample; averaging per item keeps batched CFG equal to two separate passes.
    """
    if q.dim() != 4:
        raise ValueError("enhance_score needs per-head q/k: [B, tokens, heads, head_dim]")
    b, tokens = q.shape[:2]
    heads, dim = q.shape[2], q.shape[3]
    if tokens % num_frames:
        raise ValueError(f"{tokens} tokens do not split into {num_frames} frames")
    spatial = tokens // num_frames

    def per_position(t: torch.Tensor) -> torch.Tensor:  # [B, F, S, N, C] -> [B·S, N, F, C]
        t = t.reshape(b, num_frames, spatial, heads, dim).permute(0, 2, 3, 1, 4)
        return t.reshape(b * spatial, heads, num_frames, dim)

    qf, kf = per_position(q).float(), per_position(k).float()
    attn = torch.softmax((qf * dim ** -0.5) @ kf.transpose(-1, -2), dim=-1)  # [B·S, N, F, F]
    off_diag = attn.sum(dim=(-1, -2)) - attn.diagonal(dim1=-2, dim2=-1).sum(-1)
    mean_scores = off_diag / (num_frames * num_frames - num_frames)  # [B·S, N]
    per_item = mean_scores.reshape(b, spatial * heads).mean(dim=1)
    return (per_item * (num_frames + weight)).clamp(min=1.0)
