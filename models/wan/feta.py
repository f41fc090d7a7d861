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

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FetaArgs:
    weight: float = 2.0
    start_percent: float = 0.0
    end_percent: float = 1.0

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


class FetaState:
    """What the hooks read at run time: on/off, the frame count of the current forward, the weight."""

    def __init__(self, weight: float):
        self.weight = weight
        self.enabled = False
        self.num_frames = 1
        self.frame_tokens = 0  # tokens per latent frame (h·w/4); 0 = all tokens belong to the frames
        self.captured: dict[int, dict[str, torch.Tensor]] = {}


class FetaPatch:
    """Context manager installing FETA hooks on the `self_attn` of the given blocks (see module docstring)."""

    def __init__(self, blocks: Iterable[nn.Module], num_heads: int, state: FetaState):
        self.blocks = list(blocks)
        self.num_heads = num_heads
        self.state = state
        self._handles: list = []

    def _capture(self, index: int, key: str):
        def hook(module, args, out):
            if self.state.enabled and self.state.num_frames > 1:
                self.state.captured.setdefault(index, {})[key] = out
        return hook

    def _scale(self, index: int):
        def hook(module, args, out):
            got = self.state.captured.pop(index, None)
            if not (self.state.enabled and self.state.num_frames > 1) or not got or len(got) < 2:
                return None
            q, k = got["q"], got["k"]
            if self.state.frame_tokens:  # drop padding tokens past the video, if any
                q = q[:, :self.state.num_frames * self.state.frame_tokens]
                k = k[:, :self.state.num_frames * self.state.frame_tokens]
            b, tokens = q.shape[:2]
            q = q.reshape(b, tokens, self.num_heads, -1)
            k = k.reshape(b, tokens, self.num_heads, -1)
            score = enhance_score(q, k, self.state.num_frames, self.state.weight)
            return out * score.to(out.dtype).view(b, *([1] * (out.dim() - 1)))
        return hook

    def __enter__(self) -> FetaPatch:
        for i, block in enumerate(self.blocks):
            attn = block.self_attn
            self._handles.append(attn.norm_q.register_forward_hook(self._capture(i, "q")))
            self._handles.append(attn.norm_k.register_forward_hook(self._capture(i, "k")))
            self._handles.append(attn.register_forward_hook(self._scale(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.state.captured.clear()
