"""Normalized Attention Guidance (NAG, Chen et al. 2025) for the Wan DiT's text cross-attention.

CFG extrapolates between two whole model outputs; few-step (distilled) models break under it, so
they run at cfg 1 and lose the negative prompt. NAG guides inside every block's text
cross-attention instead, for the positive branch only: with z⁺ the attention output over the
positive prompt and z⁻ the one over the negative prompt (same queries),

    z̃ = s·z⁺ − (s − 1)·z⁻                                     (extrapolation, scale s)
    z̃ ← z̃ · τ‖z⁺‖₁ / ‖z̃‖₁   where ‖z̃‖₁ / ‖z⁺‖₁ > τ         (per-token L1 clipping, tau τ)
    z  = α·z̃ + (1 − α)·z⁺                                     (blend, alpha α)

(norms over the channel axis, one per token; a 1e-7 guard in the clipping's denominator). The
image branch of i2v models and the output projection are untouched; z replaces z⁺ before the
projection. Defaults: s 11, τ 2.5, α 0.25 (the authors' Wan settings).

`NagGuide` projects the negative prompt once per run (the model's own text embedding) and hands
the blocks a `BlockNag` naming the batch rows it applies to; WanCrossAttention calls `guide`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...kernels.attention import attention

L1_GUARD = 1e-7


@dataclass(frozen=True)
class NagArgs:
    scale: float = 11.0
    tau: float = 2.5
    alpha: float = 0.25
    negative: torch.Tensor | None = None      # [L, text_dim] negative prompt for NAG; None: the sampler's own

    def __post_init__(self):
        for name, value, low in (("nag_scale", self.scale, 1.0), ("nag_tau", self.tau, 0.0),
                                 ("nag_alpha", self.alpha, 0.0)):
            if not math.isfinite(value) or value < low:
                raise ValueError(f"Wan NAG Options: {name} must be a finite number >= {low:g}, got {value!r} "
                                 f"(defaults: nag_scale 11, nag_tau 2.5, nag_alpha 0.25).")
        if self.alpha > 1.0:
            raise ValueError(f"Wan NAG Options: nag_alpha blends guided and plain attention and must be in [0, 1], "
                             f"got {self.alpha!r} (default 0.25).")


def nag_blend(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float) -> torch.Tensor:
    """The NAG formula (module docstring) on attention outputs [..., channels], in their dtype."""
    guided = z_pos * scale - z_neg * (scale - 1.0)
    norm_pos = z_pos.abs().sum(dim=-1, keepdim=True)
    norm_guided = guided.abs().sum(dim=-1, keepdim=True)
    ratio = torch.nan_to_num(norm_guided / norm_pos, nan=math.inf)   # 0/0: nothing to keep, clip it
    clipped = guided * (norm_pos * tau / (norm_guided + L1_GUARD))
    guided = torch.where(ratio > tau, clipped, guided)
    return guided * alpha + z_pos * (1.0 - alpha)


@dataclass(frozen=True)
class BlockNag:
    """NAG for one forward: the projected negative context and the batch rows (positive branch) it guides."""

    context: torch.Tensor          # [1, L_text, dim] projected negative prompt (compute dtype)
    rows: tuple[int, ...]
    scale: float
    tau: float
    alpha: float

    def guide(self, attn: nn.Module, q: torch.Tensor, out: torch.Tensor, backend: str) -> torch.Tensor:
        """The text attention output `out` [B, L, H·D] with the guided rows replaced (q: [B, L, H, D])."""
        rows = torch.tensor(self.rows, device=out.device)
        heads = (attn.num_heads, -1)
        ctx = self.context.expand(len(self.rows), *self.context.shape[1:])
        k = attn.norm_k(attn.k(ctx)).unflatten(-1, heads)
        v = attn.v(ctx).unflatten(-1, heads)
        z_neg = attention(q.index_select(0, rows), k, v, backend=backend, layout="bshd").flatten(2)
        guided = nag_blend(out.index_select(0, rows), z_neg, self.scale, self.tau, self.alpha)
        return out.index_copy(0, rows, guided.to(out.dtype))


class NagGuide:
    """A run's NAG: the negative prompt projected once through the DiT's text embedding."""

    def __init__(self, args: NagArgs, dit: nn.Module, negative: torch.Tensor):
        self.args = args
        self.dit = dit
        self.negative = args.negative if args.negative is not None else negative
        self._context: torch.Tensor | None = None

    def context(self, device: torch.device) -> torch.Tensor:
        if self._context is None or self._context.device != device:
            cfg = self.dit.config
            text = self.negative.to(device=device, dtype=self.dit.compute_dtype)[None]
            if text.shape[1] < cfg.text_len:   # padded like the prompts (models/wan/dit.py embed)
                text = torch.cat([text, text.new_zeros(1, cfg.text_len - text.shape[1], text.shape[2])], dim=1)
            with torch.no_grad():
                self._context = self.dit.text_embedding(text)
        return self._context

    def for_rows(self, branches: list[int], device: torch.device) -> BlockNag | None:
        """The BlockNag for a batch whose rows are these CFG branches (0 positive), None if no row is positive."""
        rows = tuple(i for i, branch in enumerate(branches) if branch == 0)
        if not rows:
            return None
        a = self.args
        return BlockNag(self.context(device), rows, a.scale, a.tau, a.alpha)
