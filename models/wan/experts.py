"""Wan 2.2 A14B two-expert sampling: which expert denoises which step, and each expert's cfg.

The A14B models come as two DiTs of the Wan 2.1 14B layout: a high-noise expert for the first,
noisiest part of the schedule and a low-noise expert for the rest. The official pipeline switches
at a fixed fraction of the 1000-step timestep range (t2v 0.875, i2v 0.900) — the step whose
timestep t satisfies t >= boundary·1000 runs the high-noise expert — and guides each expert with
its own scale (t2v: 4.0 high / 3.0 low; i2v: 3.5 both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

OFFICIAL_BOUNDARY = {"t2v": 0.875, "i2v": 0.900}
OFFICIAL_CFG = {"t2v": (4.0, 3.0), "i2v": (3.5, 3.5)}   # (high-noise expert, low-noise expert)
NUM_TRAIN_TIMESTEPS = 1000


def expert_variant(config) -> str:
    """'t2v' or 'i2v' for an A14B expert. Inferred from the patch embedding's input channels
    (16 noisy-latent channels for t2v; 16 + 20 conditioning channels for i2v)."""
    return "i2v" if config.in_dim == 36 else "t2v"


@dataclass(frozen=True)
class ExpertPlan:
    """Which expert runs each step (True = high-noise) and the cfg of each."""

    boundary: float
    high_cfg: float
    low_cfg: float
    high_steps: tuple[bool, ...]

    def uses_high(self, step: int) -> bool:
        return self.high_steps[step]

    def cfg(self, step: int) -> float:
        return self.high_cfg if self.high_steps[step] else self.low_cfg


def plan_experts(variant: str, timesteps: Sequence[float], cfg: float, boundary: float | None = None,
                 low_cfg: float | None = None) -> ExpertPlan:
    """The official switch for `variant`; `boundary` / `low_cfg` None keep the official values."""
    if boundary is None:
        boundary = OFFICIAL_BOUNDARY[variant]
    if not (math.isfinite(boundary) and 0.0 <= boundary <= 1.0):
        raise ValueError(f"boundary must be a fraction of the timestep range in [0, 1], got {boundary} "
                         f"(official: {OFFICIAL_BOUNDARY[variant]} for {variant}; -1 picks it).")
    if low_cfg is None:
        low_cfg = OFFICIAL_CFG[variant][1]
    if not math.isfinite(low_cfg) or low_cfg < 0:
        raise ValueError(f"cfg_low_noise must be a finite number >= 0, got {low_cfg} (-1 picks the official value).")
    threshold = boundary * NUM_TRAIN_TIMESTEPS
    return ExpertPlan(boundary, cfg, low_cfg, tuple(t >= threshold for t in timesteps))


def check_expert_pair(high, low) -> None:
    """A low-noise expert must be the same family as the high-noise one (same layout and inputs)."""
    a, b = high.config, low.config
    fields = ("model_type", "in_dim", "out_dim", "dim", "text_dim", "num_heads")
    diff = [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
    if diff:
        raise ValueError(f"The low-noise expert {low.name} is not of the same family as {high.name} "
                         f"({'; '.join(diff)}): load the matching pair (both t2v or both i2v A14B experts).")
