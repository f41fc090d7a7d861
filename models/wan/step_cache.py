"""Step caches: skip whole DiT forwards when the predicted change since the last computed step is
small, reusing that step's residual. One state per CFG branch and context window.

  teacache  (Liu et al. 2024): the relative L1 change of the time modulation e0 between steps,
            rescaled by a per-model polynomial, is accumulated; below `threshold` the block stack is
            skipped and the cached residual (tokens after − before the blocks) added instead.
  magcache  (Ma et al. 2025): the calibrated magnitude ratio of consecutive residuals γ_t is
            multiplied up over skipped steps; |1 − Πγ| is accumulated as the error; skip while it
            is below `threshold` and at most K steps in a row, never in the first `retention` part.
  easycache (Zhou et al. 2025): the change of the model *input* x since the previous step (mean
            |Δx|), times the transformation rate k = mean|Δv| / mean|Δx| measured between the last
            two computed steps, relative to the last output (mean |v|), is accumulated as the
            predicted output change; below `threshold` the output is the input plus the cached
            transformation (v − x) of the last computed step.

Every method always computes the first step of its window and the last step of the schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .cache_tables import MAG_RATIOS, TEACACHE_COEFFICIENTS

METHODS = ("teacache", "magcache", "easycache")
DEFAULT_THRESHOLDS = {"teacache": 0.3, "magcache": 0.12, "easycache": 0.05}
MAX_THRESHOLD = 1.0


@dataclass(frozen=True)
class CacheArgs:
    method: str = "teacache"
    threshold: float = 0.3
    start_step: int = 1
    end_step: int = -1
    cache_device: str = "main_device"     # or "offload_device": where residuals wait between steps
    magcache_k: int = 2
    retention: float = 0.2
    # Calibration of this model (models/wan/cache_calibration.py); empty: the published tables.
    coefficients: tuple[float, ...] = ()   # teacache polynomial, highest power first
    mag_ratios: tuple[float, ...] = ()     # magcache ratios per step, cond/uncond interleaved, led by 1.0, 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown cache '{self.method}'. Valid choices: {', '.join(METHODS)}.")
        if not (math.isfinite(self.threshold) and 0.0 < self.threshold <= MAX_THRESHOLD):
            raise ValueError(f"{self.method} threshold must be in (0, {MAX_THRESHOLD}], got {self.threshold} "
                             f"(default {DEFAULT_THRESHOLDS[self.method]}; higher skips more steps).")
        if self.start_step < 0:
            raise ValueError(f"cache start_step must be >= 0, got {self.start_step}.")
        if 0 <= self.end_step <= self.start_step:
            raise ValueError(f"cache end_step {self.end_step} must be above start_step {self.start_step} "
                             "(or -1 for the last step).")
        if self.magcache_k < 1:
            raise ValueError(f"magcache_k (most steps skipped in a row) must be >= 1, got {self.magcache_k}.")
        if not (math.isfinite(self.retention) and 0.0 <= self.retention < 1.0):
            raise ValueError(f"retention must be in [0, 1), got {self.retention}.")
        if not all(math.isfinite(c) for c in (*self.coefficients, *self.mag_ratios)):
            raise ValueError("cache calibration holds a NaN or infinite value; calibrate again on a finished run.")
        if self.mag_ratios and (len(self.mag_ratios) < 4 or len(self.mag_ratios) % 2):
            raise ValueError(f"mag_ratios needs a cond and an uncond value per step (an even count, at least 4); "
                             f"got {len(self.mag_ratios)} values.")
        if self.cache_device not in ("main_device", "offload_device"):
            raise ValueError(f"cache_device must be main_device or offload_device, got '{self.cache_device}'.")


def teacache_coefficients(dim: int, model_type: str, pixels: int) -> tuple[float, ...]:
    """The published polynomial for the model: 1.3B or 14B t2v, i2v 480p or 720p (by output area)."""
    if model_type != "t2v":
        return TEACACHE_COEFFICIENTS["i2v_720p" if pixels >= 1280 * 720 * 0.9 else "i2v_480p"]
    return TEACACHE_COEFFICIENTS["t2v_14b" if dim >= 5120 else "t2v_1.3b"]


def polyval(coefficients, x: float) -> float:
    out = 0.0
    for c in coefficients:
        out = out * x + c
    return out


def interp_ratios(ratios: tuple[float, ...], steps: int) -> list[float]:
    """Nearest-neighbour resampling of a calibrated per-step ratio curve to `steps` values."""
    if steps == 1:
        return [ratios[-1]]
    scale = (len(ratios) - 1) / (steps - 1)
    return [ratios[int(math.floor(i * scale + 0.5))] for i in range(steps)]


def mag_ratios(dim: int, model_type: str, steps: int, branch: int) -> list[float]:
    """The per-step ratio curve for one CFG branch (0 cond, 1 uncond), resampled to `steps`."""
    key = "i2v" if model_type != "t2v" else ("t2v_14b" if dim >= 5120 else "t2v_1.3b")
    table = MAG_RATIOS[key]
    return interp_ratios(tuple(table[branch::2]), steps)


@dataclass
class _BranchState:
    accumulated: float = 0.0
    previous: torch.Tensor | None = None       # teacache: e0; easycache: model input x
    residual: torch.Tensor | None = None       # teacache/magcache: token residual; easycache: v − x
    ratio: float = 1.0                         # magcache: Π γ since the last computed step
    skipped_in_row: int = 0
    k: float | None = None                     # easycache: output/input change ratio
    last_output: torch.Tensor | None = None    # easycache: v of the last computed step
    last_input: torch.Tensor | None = None     # easycache: x of the last computed step


@dataclass
class CacheReport:
    computed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def count(self, branch: str, skipped: bool) -> None:
        target = self.skipped if skipped else self.computed
        target[branch] = target.get(branch, 0) + 1

    def summary(self, method: str) -> str:
        parts = []
        for branch in sorted(set(self.computed) | set(self.skipped)):
            skipped, done = self.skipped.get(branch, 0), self.computed.get(branch, 0)
            parts.append(f"{branch} {skipped}/{skipped + done}")
        return f"Wan: {method} skipped " + (", ".join(parts) or "nothing") + " forwards"


class StepCache:
    """Decisions and stored residuals for one sampling run (all branches and windows)."""

    def __init__(self, args: CacheArgs, dim: int, model_type: str, pixels: int, steps: int,
                 store_device: torch.device | None = None):
        self.args = args
        self.steps = steps
        self.store_device = store_device
        self.coefficients = args.coefficients or teacache_coefficients(dim, model_type, pixels)
        self.ratio_curves = {b: interp_ratios(args.mag_ratios[b::2], steps) if args.mag_ratios else
                             mag_ratios(dim, model_type, steps, b) for b in (0, 1)}
        self.states: dict[tuple, _BranchState] = {}
        self.report = CacheReport()

    def _state(self, key) -> _BranchState:
        return self.states.setdefault(key, _BranchState())

    def _window(self, step: int) -> bool:
        end = self.steps - 1 if self.args.end_step < 0 else min(self.args.end_step, self.steps - 1)
        return self.args.start_step <= step < end

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.store_device is None else t.to(self.store_device)

    def _load(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device)

    # ---------------------------------------------------------------- teacache / magcache (token level)
    def skip_blocks(self, key, branch: int, step: int, e0: torch.Tensor) -> bool:
        """Whether this branch may reuse its residual instead of running the blocks."""
        state = self._state(key)
        method = self.args.method
        if method == "teacache":
            decision = False
            if state.previous is not None and state.residual is not None and self._window(step):
                prev = state.previous.to(e0.device)
                rel = ((e0 - prev).abs().mean() / prev.abs().mean()).item()
                state.accumulated += polyval(self.coefficients, rel)
                decision = state.accumulated < self.args.threshold
            if not decision:
                state.accumulated = 0.0
            state.previous = self._store(e0)
        else:   # magcache
            decision = False
            retained = step < int(self.args.retention * self.steps)
            if state.residual is not None and self._window(step) and not retained:
                ratio = state.ratio * self.ratio_curves[branch][step]
                error = state.accumulated + abs(1.0 - ratio)
                if error < self.args.threshold and state.skipped_in_row < self.args.magcache_k:
                    state.ratio, state.accumulated = ratio, error
                    state.skipped_in_row += 1
                    decision = True
            if not decision:
                state.ratio, state.accumulated, state.skipped_in_row = 1.0, 0.0, 0
        self.report.count(("cond", "uncond")[branch], decision)
        return decision

    def revoke_skip(self, key, branch: int) -> None:
        """A skip this branch was granted but cannot take (its batch partner must compute): it is
        computed after all, so its predicted error starts again from zero."""
        state = self.states[key]
        state.accumulated, state.ratio, state.skipped_in_row = 0.0, 1.0, 0
        name = ("cond", "uncond")[branch]
        self.report.skipped[name] -= 1
        self.report.computed[name] = self.report.computed.get(name, 0) + 1

    def residual(self, key, like: torch.Tensor) -> torch.Tensor:
        return self._load(self.states[key].residual, like)

    def remember_residual(self, key, residual: torch.Tensor) -> None:
        self._state(key).residual = self._store(residual)

    # ---------------------------------------------------------------- easycache (model level)
    def skip_forward(self, key, branch: int, step: int, x: torch.Tensor) -> torch.Tensor | None:
        """The reused velocity for this branch, or None when the model must run."""
        state = self._state(key)
        decision = False
        if state.previous is not None and state.k is not None and self._window(step):
            prev = state.previous.to(x.device)
            output = state.last_output.to(x.device)
            change = ((x - prev).abs().mean() / output.abs().mean().clamp_min(1e-12)).item()
            state.accumulated += state.k * change
            decision = state.accumulated < self.args.threshold
        state.previous = self._store(x)
        self.report.count(("cond", "uncond")[branch], decision)
        if decision:
            return x + self._load(state.residual, x)
        state.accumulated = 0.0
        return None

    def remember_output(self, key, x: torch.Tensor, v: torch.Tensor) -> None:
        state = self._state(key)
        if state.last_output is not None:
            last_out, last_in = state.last_output.to(v.device), state.last_input.to(x.device)
            out_change = (v - last_out).abs().mean()
            in_change = (x - last_in).abs().mean()
            state.k = (out_change / in_change.clamp_min(1e-12)).item()
        state.last_output, state.last_input = self._store(v), self._store(x)
        state.residual = self._store(v - x)
