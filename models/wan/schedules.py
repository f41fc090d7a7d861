"""σ schedules beside the official shifted-uniform one: beta spacing, the fixed timestep lists of
step-distilled Wan models (CausVid, lightx2v-style 4-step distills) and user-given SIGMAS.

The generators return the σ values of the steps (descending, without the final 0); the caller
appends 0 and derives the DiT's timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..common.flow import shift_sigma

NUM_TRAIN_TIMESTEPS = 1000
BETA_ALPHA = BETA_BETA = 0.6     # ComfyUI's beta scheduler defaults

# Timestep lists the distilled models were trained on (denoising_step_list of each release).
CAUSVID_14B_TIMESTEPS = (999, 934, 862, 756, 603, 410, 250, 140, 74)
CAUSVID_1_3B_TIMESTEPS = (1000, 750, 500, 250)
DISTILL_TIMESTEPS = (999, 750, 500, 250)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), float64."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """Inverse of `beta_cdf` by bisection (60 halvings: exact to float64)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if beta_cdf(mid, a, b) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta_sigmas(steps: int, shift: float, sigma_max: float) -> list[float]:
    """ComfyUI's beta scheduler on the shifted flow: timestep positions at the beta(0.6, 0.6)
    quantiles of 1 − i/steps (dense at both ends of the schedule), rounded to the 1000-step grid,
    repeats dropped."""
    top = NUM_TRAIN_TIMESTEPS - 1
    positions = []
    for i in range(steps):
        pos = round(beta_ppf(1.0 - i / steps, BETA_ALPHA, BETA_BETA) * top)
        if not positions or pos != positions[-1]:
            positions.append(pos)
    return [shift_sigma(min(sigma_max, (p + 1) / NUM_TRAIN_TIMESTEPS), shift) for p in positions]


def causvid_sigmas(steps: int, dim: int) -> list[float]:
    """CausVid's timestep list (14B: 9 values; 1.3B: 4), the first `steps`; σ = t / 1000 (no shift)."""
    table = CAUSVID_14B_TIMESTEPS if dim >= 5120 else CAUSVID_1_3B_TIMESTEPS
    if steps > len(table):
        raise ValueError(f"flowmatch_causvid has {len(table)} steps for this model size; set steps to "
                         f"{len(table)} or fewer.")
    return [t / NUM_TRAIN_TIMESTEPS for t in table[:steps]]


def distill_sigmas(steps: int, shift: float) -> list[float]:
    """The 4-step distill schedule: the shifted 1000-step training grid read at the timesteps
    999, 750, 500, 250 (grid position 1000 − t), the first `steps` of them."""
    if steps > len(DISTILL_TIMESTEPS):
        raise ValueError(f"flowmatch_distill is a {len(DISTILL_TIMESTEPS)}-step schedule; set steps to "
                         f"{len(DISTILL_TIMESTEPS)} or fewer.")
    return [shift_sigma(1.0 - (NUM_TRAIN_TIMESTEPS - t) / NUM_TRAIN_TIMESTEPS, shift)
            for t in DISTILL_TIMESTEPS[:steps]]


def check_sigmas(values: Sequence[float]) -> list[float]:
    """A user SIGMAS: at least two finite values in [0, 1], descending. It is taken as given: a
    list that stops above 0 (the first half of core's SplitSigmas) leaves the latent noisy there."""
    sigmas = [float(v) for v in values]
    if len(sigmas) < 2:
        raise ValueError(f"SIGMAS needs at least 2 values (one step), got {len(sigmas)}.")
    if any(not math.isfinite(s) or not 0.0 <= s <= 1.0 for s in sigmas):
        raise ValueError("Wan is a flow model: every SIGMAS value must be in [0, 1] (1 = pure noise); "
                         f"got {sigmas}. Use a flow scheduler (e.g. core BasicScheduler on a Wan model, or "
                         "ModelSamplingSD3-style shifted sigmas).")
    if any(b > a for a, b in zip(sigmas, sigmas[1:], strict=False)):
        raise ValueError(f"SIGMAS must be descending, got {sigmas}.")
    return sigmas
