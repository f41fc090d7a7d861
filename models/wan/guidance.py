"""Guidance extras for the Wan sampler: Skip Layer Guidance, CFG-Zero*, RIFLEx and per-step cfg.

SLG (as Wan samplers apply it): in the steps between start and end percent, the negative branch
runs without the chosen blocks; guidance then pushes away from that weakened prediction as well
as from the negative prompt.
CFG-Zero* (Fan et al. 2025): v = s*·u + w·(c − s*·u) with s* = ⟨c, u⟩ / ‖u‖² per sample (the
projection of the conditional velocity onto the unconditional one), and the velocity of the first
`zero_init_steps` steps set to zero.
Phantom (Liu et al. 2025, Phantom-Wan): two scales, one for the subject images and one for the text,
over three branches (see `phantom_combine`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..common.block_list import parse_block_list
from .layers import rope_angles


@dataclass(frozen=True)
class SLGArgs:
    blocks: tuple[int, ...]
    start_percent: float = 0.1
    end_percent: float = 1.0

    def __post_init__(self):
        if not self.blocks:
            raise ValueError("Skip Layer Guidance needs at least one block index (e.g. '9' or '8,9').")
        if any(b < 0 for b in self.blocks):
            raise ValueError(f"SLG block indices must be >= 0, got {list(self.blocks)}.")
        if not (0.0 <= self.start_percent <= self.end_percent <= 1.0):
            raise ValueError(f"SLG needs 0 <= start_percent <= end_percent <= 1, got {self.start_percent}, "
                             f"{self.end_percent}.")

    def check_model(self, num_layers: int, name: str) -> None:
        bad = [b for b in self.blocks if b >= num_layers]
        if bad:
            raise ValueError(f"SLG blocks {bad} are past the model: {name} has {num_layers} blocks "
                             f"(indices 0-{num_layers - 1}).")

    def active_at(self, step: int, steps: int) -> bool:
        return self.start_percent <= step / steps <= self.end_percent


def parse_blocks(text: str) -> tuple[int, ...]:
    """'8, 9' or '8-10' -> (8, 9[, 10])."""
    return parse_block_list(text, "SLG blocks")


def parse_cfg_list(text: str) -> tuple[float, ...] | None:
    """'6, 6, 5, 4' -> (6.0, 6.0, 5.0, 4.0); empty -> None (the sampler's cfg for every step)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        return None
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"cfg_per_step must be comma-separated numbers, one per step, got '{text}'.") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"Every per-step cfg must be a finite number >= 0, got '{text}'.")
    return values


@dataclass(frozen=True)
class GuidanceArgs:
    cfg_zero_star: bool = False
    zero_init_steps: int = 0
    cfg_per_step: tuple[float, ...] | None = None
    riflex_freq_index: int = 0      # RIFLEx: 1-based temporal RoPE frequency to retune; 0 = off

    def __post_init__(self):
        if self.zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be >= 0, got {self.zero_init_steps}.")
        if self.riflex_freq_index < 0:
            raise ValueError(f"riflex_freq_index must be >= 0 (0 = off), got {self.riflex_freq_index}.")


def riflex_cos_sin(grid: tuple[int, int, int], axes: tuple[int, int, int], k: int, device: torch.device):
    """RoPE tables with RIFLEx (Zhao et al. 2025): the k-th temporal frequency (the video's intrinsic
    one, 1-based) is set to 0.9·2π / F for F latent frames, so that it completes less than one period
    over the video and a longer-than-trained video does not repeat itself."""
    if not 1 <= k <= axes[0] // 2:
        raise ValueError(f"riflex_freq_index must be between 1 and {axes[0] // 2} (the temporal RoPE pairs), "
                         f"got {k}; 0 turns RIFLEx off (6 is the usual value for Wan).")
    angles = rope_angles(grid, axes, device)
    frames, rows, cols = grid
    frame_of_token = torch.arange(frames, device=device, dtype=angles.dtype).repeat_interleave(rows * cols)
    angles[:, k - 1] = frame_of_token * (0.9 * 2 * math.pi / frames)
    return torch.cos(angles).float()[None, :, None, :], torch.sin(angles).float()[None, :, None, :]


def check_cfg_list(values: Sequence[float] | None, steps: int) -> None:
    if values is not None and len(values) != steps:
        raise ValueError(f"cfg_per_step has {len(values)} values but the schedule has {steps} steps: give one "
                         "value per step.")


def cfg_zero_star_scale(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """s* = ⟨c, u⟩ / ‖u‖² per batch item, shaped to broadcast over [B, ...]."""
    c, u = cond.flatten(1).double(), uncond.flatten(1).double()
    scale = (c * u).sum(1) / (u * u).sum(1).clamp_min(1e-8)
    return scale.to(cond.dtype).view(-1, *([1] * (cond.dim() - 1)))


def combine(cond: torch.Tensor, uncond: torch.Tensor, cfg: float, zero_star: bool) -> torch.Tensor:
    """Classifier-free guidance, optionally CFG-Zero*'s optimised scale."""
    if zero_star:
        uncond = uncond * cfg_zero_star_scale(cond, uncond)
    return uncond + cfg * (cond - uncond)


def phantom_combine(text_subject: torch.Tensor, subject: torch.Tensor, neither: torch.Tensor,
                    text_cfg: float, subject_cfg: float) -> torch.Tensor:
    """Phantom-Wan's guidance: neither + subject_cfg·(subject − neither) + text_cfg·(text_subject − subject).

    `text_subject` is the prediction with the prompt and the subject frames, `subject` the one with the
    negative prompt and the subject frames, `neither` the one with the negative prompt and empty
    (zero) subject frames. Equal scales give plain CFG between the first and the last branch; the
    official defaults are text 7.5 and subject 5.0."""
    return neither + subject_cfg * (subject - neither) + text_cfg * (text_subject - subject)
