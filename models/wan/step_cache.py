"""Step caches: skip whole DiT forwards when the predicted change since the last computed step is
small, reusing that step's residual. One state per CFG branch and context window (EasyCache: one
decision per step and window, shared by the branches).

  teacache  (Liu et al. 2024): the relative L1 change of the time modulation e0 between steps,
            rescaled by a per-model polynomial, is accumulated; below `threshold` the block stack is
            skipped and the cached residual (tokens after − before the blocks) added instead.
  magcache  (Ma et al. 2025): the calibrated magnitude ratio of consecutive residuals γ_t is
            multiplied up over skipped steps; |1 − Πγ| is accumulated as the error; skip while it
            is below `threshold` and at most K steps in a row, never in the first `retention` part.
  easycache (Zhou et al. 2025), as in ComfyUI core: the transformation rate k = mean|Δv| / mean|Δx|
            is measured between the last two computed steps; each step adds k times the input's
            change since the last *computed* step, mean|x_t − x_c|, over that step's output mean|v_c|,
            to the predicted output change (so a run of skips adds ever larger amounts); below
            `threshold` the output is the input plus the cached transformation (v − x) of the last
            computed step. One decision per step and latent (window): the first branch seen (cond)
            decides, the other CFG branches follow it.

Every method always computes the first step of its window and the last step of the schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .cache_tables import MAG_RATIOS, TEACACHE_COEFFICIENTS

METHODS = ("teacache", "magcache", "easycache")
DEFAULT_THRESHOLDS = {"teacache": 0.3, "magcache": 0.12, "easycache": 0.2}
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


BRANCH_NAMES = ("cond", "uncond", "uncond+subject")   # row 0, 1 and Phantom's negative with its subjects


@dataclass
class _BranchState:
    accumulated: float = 0.0
    previous: torch.Tensor | None = None       # teacache: e0
    residual: torch.Tensor | None = None       # teacache/magcache: token residual; easycache: v − x
    ratio: float = 1.0                         # magcache: Π γ since the last computed step
    skipped_in_row: int = 0


@dataclass
class _EasyGroup:
    """EasyCache's prediction for one latent (batch item, context window): the CFG branches of a step
    share one decision, made by its leader (the first branch seen, as core's first cond) from the
    leader's own input and output, so cond and uncond never drift apart on different steps."""
    leader: object = None
    accumulated: float = 0.0
    k: float | None = None                     # output/input change ratio of the last two computed steps
    last_input: torch.Tensor | None = None     # x_c: the leader's input at the last computed step
    last_output: torch.Tensor | None = None    # v_c: its output there
    last_norm: float = 0.0                     # mean |v_c|
    step: int = -1                             # the step last decided


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
        self.groups: dict[object, _EasyGroup] = {}          # easycache: per latent (batch item, window)
        self._group_of: dict[object, object] = {}
        self.step_decisions: dict[tuple, bool] = {}          # easycache: (group, step) -> skipped
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
                ratio = state.ratio * self.ratio_curves[min(branch, 1)][step]
                error = state.accumulated + abs(1.0 - ratio)
                if error < self.args.threshold and state.skipped_in_row < self.args.magcache_k:
                    state.ratio, state.accumulated = ratio, error
                    state.skipped_in_row += 1
                    decision = True
            if not decision:
                state.ratio, state.accumulated, state.skipped_in_row = 1.0, 0.0, 0
        self.report.count(BRANCH_NAMES[branch], decision)
        return decision

    def revoke_skip(self, key, branch: int) -> None:
        """A skip this branch was granted but cannot take (its batch partner must compute): it is
        computed after all, so its predicted error starts again from zero (EasyCache: the step's shared
        decision becomes "computed" when the revoked branch is the one that decides)."""
        state = self.states[key]
        state.accumulated, state.ratio, state.skipped_in_row = 0.0, 1.0, 0
        group_key = self._group_of.get(key)
        if group_key is not None:
            group = self.groups[group_key]
            if group.leader == key:
                group.accumulated = 0.0
                self.step_decisions[(group_key, group.step)] = False
        name = BRANCH_NAMES[branch]
        self.report.skipped[name] -= 1
        self.report.computed[name] = self.report.computed.get(name, 0) + 1

    def residual(self, key, like: torch.Tensor) -> torch.Tensor:
        return self._load(self.states[key].residual, like)

    def remember_residual(self, key, residual: torch.Tensor) -> None:
        self._state(key).residual = self._store(residual)

    # ---------------------------------------------------------------- easycache (model level)
    def skip_forward(self, key, branch: int, step: int, x: torch.Tensor, group=None) -> torch.Tensor | None:
        """The reused velocity for this branch, or None when the model must run. `group` names the
        latent the branch belongs to (its batch item and window; default: the key itself); the first
        branch of a group to ask decides for every branch of that group at this step."""
        group_key, shared = self._join(key, group)
        decision = self.step_decisions.get((group_key, step))
        if decision is None:
            # A follower asking before its leader at this step (the leader did not run here) computes.
            decision = self._decide(shared, step, x) if key == shared.leader else False
            if key == shared.leader:
                self.step_decisions[(group_key, step)] = decision
                shared.step = step
        state = self._state(key)
        reuse = decision and state.residual is not None   # a branch never computed yet must run
        self.report.count(BRANCH_NAMES[branch], reuse)
        return x + self._load(state.residual, x) if reuse else None

    def _join(self, key, group) -> tuple[object, _EasyGroup]:
        """(group key, its shared state) for a branch; the first branch of a group becomes its leader."""
        group_key = key if group is None else group
        self._group_of[key] = group_key
        shared = self.groups.setdefault(group_key, _EasyGroup())
        if shared.leader is None:
            shared.leader = key
        return group_key, shared

    def _decide(self, shared: _EasyGroup, step: int, x: torch.Tensor) -> bool:
        """Core's rule: add k · mean|x_t − x_c| / mean|v_c| and skip while the sum is under the threshold."""
        if shared.k is None or shared.last_input is None or not self._window(step):
            shared.accumulated = 0.0
            return False
        change = (x - shared.last_input.to(x.device)).abs().mean().item() / max(shared.last_norm, 1e-12)
        shared.accumulated += shared.k * change
        if shared.accumulated < self.args.threshold:
            return True
        shared.accumulated = 0.0
        return False

    def remember_output(self, key, x: torch.Tensor, v: torch.Tensor, group=None) -> None:
        """A computed forward: the branch's transformation v − x is kept for reuse; the leader's input
        and output become the new x_c, v_c and give the new rate k."""
        self._state(key).residual = self._store(v - x)
        _, shared = self._join(key, group)
        if key != shared.leader:
            return
        if shared.last_output is not None:
            out_change = (v - shared.last_output.to(v.device)).abs().mean()
            in_change = (x - shared.last_input.to(x.device)).abs().mean()
            shared.k = (out_change / in_change.clamp_min(1e-12)).item()
        shared.last_input, shared.last_output = self._store(x), self._store(v)
        shared.last_norm = v.abs().mean().item()
        shared.accumulated = 0.0
