"""Flow-matching solvers for Wan: schedules with shift, and UniPC / DPM++ / Euler steps (DEIS, RES,
LCM, DPM++ 2M/3M SDE and ER-SDE in models/wan/solvers_extra.py; beta, distill and user schedules in
models/wan/schedules.py).

Wan is a rectified flow: x_σ = (1−σ)·x0 + σ·ε and the DiT predicts v = ε − x0, so x0 = x_σ − σ·v.
The schedule follows the official Wan code: σ runs from σ_max to 0 in `steps` uniform steps,
each σ is shifted with σ' = shift·σ / (1 + (shift−1)·σ), a final σ = 0 is appended, and the DiT is
given the integer timestep trunc(σ'·1000) (999, 992, … for 30 steps at shift 5). UniPC starts at
σ_max = 0.999 (the official training schedule's first value), DPM++ and Euler at 1.0.

A solver is a small stateful object: `step(v, x)` advances x from σ[i] to σ[i+1] given the model's
velocity at σ[i]. The multistep solvers keep the last x0 predictions; a fresh solver per run, or
one given the exported history of the run it continues.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..common.flow import shift_sigma
from . import schedules

SOLVERS = ("unipc", "dpm++", "euler", "dpm++_sde", "deis", "lcm", "res_multistep", "er_sde", "dpm++_3m_sde")
DETERMINISTIC = ("unipc", "dpm++", "euler", "deis", "res_multistep")
# What the sampler's `scheduler` menu offers: a solver, optionally "/beta" (beta-spaced σ), or a
# fixed distill schedule (stepped with Euler).
SCHEDULES = ("flowmatch_causvid", "flowmatch_distill")
SCHEDULERS = SOLVERS + ("unipc/beta", "dpm++/beta", "euler/beta", "lcm/beta") + SCHEDULES
NUM_TRAIN_TIMESTEPS = 1000
UNIPC_SIGMA_MAX = 1.0 - 1.0 / NUM_TRAIN_TIMESTEPS


@dataclass(frozen=True)
class Schedule:
    """σ values (steps + 1, ending at 0) and the integer timesteps the DiT sees (one per step)."""

    sigmas: tuple[float, ...]
    timesteps: tuple[float, ...]

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def solver_of(scheduler: str) -> str:
    """The solver a scheduler-menu entry steps with."""
    if scheduler in SCHEDULES:
        return "euler"
    return scheduler.split("/")[0]


def _sigma_max(solver: str) -> float:
    # UniPC, DEIS and the SDE solvers start just below 1 (the training schedule's first value: their
    # log-SNR is finite there); DPM++, Euler, LCM and RES at 1.0.
    return UNIPC_SIGMA_MAX if solver in ("unipc", "deis", "dpm++_sde", "er_sde", "dpm++_3m_sde") else 1.0


def make_schedule(solver: str, steps: int, shift: float, denoise: float = 1.0, dim: int = 1536) -> Schedule:
    """The schedule of `steps` model calls for a scheduler-menu entry. With denoise < 1 the schedule
    of round(steps / denoise) steps is built and only its last `steps` are kept (ComfyUI's
    convention: the user gets exactly `steps` calls, starting from a partly noised input).
    `dim` (the DiT width) picks CausVid's table."""
    if solver not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler '{solver}'. Valid choices: {', '.join(SCHEDULERS)}.")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    total = steps if denoise >= 1.0 else max(steps, int(round(steps / denoise)))
    sigma_max = _sigma_max(solver_of(solver))
    if solver == "flowmatch_causvid":
        shifted = schedules.causvid_sigmas(total, dim)
    elif solver == "flowmatch_distill":
        shifted = schedules.distill_sigmas(total, shift)
    elif solver.endswith("/beta"):
        shifted = schedules.beta_sigmas(total, shift, sigma_max)
    else:
        raw = [sigma_max - (sigma_max - 0.0) * i / total for i in range(total)]  # linspace(σmax, 0, total+1)[:-1]
        shifted = [shift_sigma(s, shift) for s in raw]
    kept = len(shifted) if denoise >= 1.0 else min(steps, len(shifted))
    sigmas = tuple(shifted[len(shifted) - kept:]) + (0.0,)
    timesteps = tuple(float(math.trunc(s * NUM_TRAIN_TIMESTEPS)) for s in sigmas[:-1])
    return Schedule(sigmas, timesteps)


def schedule_from_sigmas(values: Sequence[float]) -> Schedule:
    """A user SIGMAS as a schedule; the DiT sees t = σ·1000 (ComfyUI's flow timestep)."""
    sigmas = tuple(schedules.check_sigmas(values))
    return Schedule(sigmas, tuple(s * NUM_TRAIN_TIMESTEPS for s in sigmas[:-1]))


def _lambda(sigma: float) -> float:
    """log-SNR of the flow: log(α/σ) with α = 1 − σ (+inf at σ = 0)."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


class Solver:
    """Advance x along the schedule; subclasses implement `_update` from x0 predictions.

    Stochastic solvers draw fresh noise through `noise(like)` (a seeded source the sampler sets).
    `export_state()` / `import_state()` carry a multistep solver's history across two samplers,
    so a run split at step k continues exactly as the unsplit run would."""

    stochastic = False

    def __init__(self, sigmas: Sequence[float]):
        self.sigmas = list(sigmas)
        self.index = 0
        self.noise: Callable[[torch.Tensor], torch.Tensor] | None = None

    def denoised(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x - self.sigmas[self.index] * v

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self._update(v, x)
        self.index += 1
        return out

    def _update(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fresh_noise(self, like: torch.Tensor) -> torch.Tensor:
        if self.noise is None:
            raise RuntimeError(f"{type(self).__name__} is stochastic: set solver.noise to a seeded source first.")
        return self.noise(like)

    def export_state(self) -> dict:
        """History (everything but the schedule and the noise source), tensors moved to the CPU."""
        return {k: _move(v, torch.device("cpu")) for k, v in vars(self).items() if k not in ("sigmas", "noise")}

    def import_state(self, state: dict, device: torch.device) -> None:
        for k, v in state.items():
            setattr(self, k, _move(v, device))


def _move(value, device: torch.device):
    """A tensor, or a list of tensors and numbers, on `device` (numbers unchanged)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    return value


class EulerSolver(Solver):
    """x_{σ'} = x_σ + (σ' − σ)·v."""

    def _update(self, v, x):
        return x + (self.sigmas[self.index + 1] - self.sigmas[self.index]) * v


class DPMPPSolver(Solver):
    """DPM-Solver++ (2M, midpoint) in data prediction, first order on the first and the last step."""

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self.prev_x0: torch.Tensor | None = None

    def _update(self, v, x):
        i = self.index
        s0, t = self.sigmas[i], self.sigmas[i + 1]
        x0 = self.denoised(v, x)
        alpha_t = 1.0 - t
        h = _lambda(t) - _lambda(s0)
        phi = math.expm1(-h)  # e^{-h} − 1
        ratio = t / s0
        first_order = self.prev_x0 is None or i == len(self.sigmas) - 2
        if first_order:
            out = ratio * x - alpha_t * phi * x0
        else:
            s1 = self.sigmas[i - 1]
            r0 = (_lambda(s0) - _lambda(s1)) / h
            d1 = (x0 - self.prev_x0) / r0
            out = ratio * x - alpha_t * phi * x0 - 0.5 * alpha_t * phi * d1
        self.prev_x0 = x0
        return out


class UniPCSolver(Solver):
    """UniPC, order 2, B(h) = e^h − 1 ("bh2"), data prediction, lower order on the last step.

    Each step first corrects the previous step's output with the new x0 (UniC), then predicts the
    next point (UniP) — the corrector reuses the model call the predictor needs anyway.
    """

    ORDER = 2

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self.x0s: list[torch.Tensor] = []     # last ORDER x0 predictions, oldest first
        self.last_x: torch.Tensor | None = None
        self.last_order = 1
        self.warmup = 0

    def _coefficients(self, hh: float, rks: Sequence[float], order: int):
        """R (Vandermonde of rks) and b for this step (in float64)."""
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1.0
        b_h = math.expm1(hh)
        rows, b, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append([r ** (i - 1) for r in rks])
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        return torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), h_phi_1, b_h

    def _history(self, base: int, h: float, order: int) -> tuple[list[float], list[torch.Tensor]]:
        """The step ratios r_k and divided differences D1_k of the older x0 predictions against the
        newest, for a step from σ[base] of log-SNR length h; r ends with 1 (the step itself)."""
        s0, m0 = self.sigmas[base], self.x0s[-1]
        rks, d1s = [], []
        for k in range(1, order):
            rk = (_lambda(self.sigmas[base - k]) - _lambda(s0)) / h
            rks.append(rk)
            d1s.append((self.x0s[-(k + 1)] - m0) / rk)
        return [*rks, 1.0], d1s

    def _correct(self, x0_new: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """UniC: recompute the step just taken (σ[i−1] → σ[i]) with the model output at σ[i]."""
        i, order = self.index, self.last_order
        s0, t = self.sigmas[i - 1], self.sigmas[i]
        m0 = self.x0s[-1]
        h = _lambda(t) - _lambda(s0)
        rks, d1s = self._history(i - 1, h, order)
        hh = -h
        r, b, h_phi_1, b_h = self._coefficients(hh, rks, order)
        rhos = [0.5] if order == 1 else torch.linalg.solve(r, b).tolist()
        alpha_t = 1.0 - t
        out = (t / s0) * self.last_x - alpha_t * h_phi_1 * m0
        corr = sum((rho * d for rho, d in zip(rhos[:-1], d1s, strict=False)), torch.zeros_like(m0))
        return out - alpha_t * b_h * (corr + rhos[-1] * (x0_new - m0))

    def _predict(self, x: torch.Tensor, order: int) -> torch.Tensor:
        i = self.index
        s0, t = self.sigmas[i], self.sigmas[i + 1]
        m0 = self.x0s[-1]
        h = _lambda(t) - _lambda(s0)
        rks, d1s = self._history(i, h, order)
        hh = -h
        _, _, h_phi_1, b_h = self._coefficients(hh, rks, order)
        alpha_t = 1.0 - t
        out = (t / s0) * x - alpha_t * h_phi_1 * m0
        if d1s:
            rhos_p = [0.5] if order == 2 else None
            if rhos_p is None:  # order > 2 is not used, but keep the general rule explicit
                r, b, _, _ = self._coefficients(hh, rks, order)
                rhos_p = torch.linalg.solve(r[:-1, :-1], b[:-1]).tolist()
            pred = sum((rho * d for rho, d in zip(rhos_p, d1s, strict=True)), torch.zeros_like(m0))
            out = out - alpha_t * b_h * pred
        return out

    def _update(self, v, x):
        x0 = self.denoised(v, x)
        if self.index > 0 and self.last_x is not None:
            x = self._correct(x0, x)
        self.x0s = (self.x0s + [x0])[-self.ORDER:]
        remaining = len(self.sigmas) - 1 - self.index
        order = min(self.ORDER, remaining, self.warmup + 1)
        self.last_x = x
        self.last_order = order
        out = self._predict(x, order)
        self.warmup = min(self.warmup + 1, self.ORDER)
        return out


def make_solver(name: str, schedule: Schedule) -> Solver:
    """A fresh solver for a scheduler-menu entry (or a bare solver name) on `schedule`."""
    from .solvers_extra import (
        DEISSolver,
        DPMPP3MSDESolver,
        DPMPPSDESolver,
        ERSDESolver,
        LCMSolver,
        RESMultistepSolver,
    )

    classes = {"unipc": UniPCSolver, "dpm++": DPMPPSolver, "euler": EulerSolver, "dpm++_sde": DPMPPSDESolver,
               "deis": DEISSolver, "lcm": LCMSolver, "res_multistep": RESMultistepSolver, "er_sde": ERSDESolver,
               "dpm++_3m_sde": DPMPP3MSDESolver}
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler '{name}'. Valid choices: {', '.join(SCHEDULERS)}.")
    return classes[solver_of(name)](schedule.sigmas)
