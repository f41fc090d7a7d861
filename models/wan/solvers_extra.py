"""More flow-matching solvers: DEIS, RES multistep (deterministic) and LCM, DPM++ 2M SDE, DPM++ 3M
SDE, ER-SDE (stochastic). Same interface as models/wan/sampling.py: `step(v, x)` from σ[i] to σ[i+1].

All are written for the rectified flow x_σ = (1−σ)·x0 + σ·ε (α = 1 − σ), whose probability-flow
ODE is dx/dσ = (x − x0)/σ. Coefficients are computed in float64 Python scalars.
"""

from __future__ import annotations

import math

import torch

from .sampling import Solver, _lambda

_GAUSS3 = ((-math.sqrt(0.6), 5 / 9), (0.0, 8 / 9), (math.sqrt(0.6), 5 / 9))  # exact to degree 5


def _lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """∫_a^b of the Lagrange basis polynomial l_j through `nodes` (Gauss–Legendre, exact here)."""
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    total = 0.0
    for xi, w in _GAUSS3:
        tau = mid + half * xi
        value = 1.0
        for m, node in enumerate(nodes):
            if m != j:
                value *= (tau - node) / (nodes[j] - node)
        total += w * value
    return half * total


class DEISSolver(Solver):
    """DEIS multistep (order 3), in data prediction. With u = x/σ and τ = α/σ the flow ODE is
    du/dτ = x0 exactly, so each step integrates the Lagrange polynomial through the last (up to 3)
    x0 predictions over [τ_i, τ_{i+1}]; order 1 is DDIM (= Euler for a flow). The step to σ = 0
    returns the current x0."""

    ORDER = 3

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self.x0s: list[torch.Tensor] = []
        self.taus: list[float] = []

    def _update(self, v, x):
        i = self.index
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self.denoised(v, x)
        tau = (1.0 - s) / s
        self.x0s = (self.x0s + [x0])[-self.ORDER:]
        self.taus = (self.taus + [tau])[-self.ORDER:]
        if s_next <= 0.0:
            return x0
        tau_next = (1.0 - s_next) / s_next
        u = x / s
        for j, x0_j in enumerate(self.x0s):
            u = u + _lagrange_integral(self.taus, j, tau, tau_next) * x0_j
        return s_next * u


class RESMultistepSolver(Solver):
    """RES second-order multistep (Zhang et al. 2023, as ComfyUI's res_multistep with eta 0): the
    exponential integrator in t = −log σ with φ-function weights on the current and previous x0;
    Euler on the first step and the step to σ = 0."""

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self.prev_x0: torch.Tensor | None = None

    def _update(self, v, x):
        i = self.index
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self.denoised(v, x)
        if s_next <= 0.0 or self.prev_x0 is None:
            out = x + (s_next - s) * v
        else:
            t, t_next, t_prev = -math.log(s), -math.log(s_next), -math.log(self.sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            out = math.exp(-h) * x + h * (b1 * x0 + b2 * self.prev_x0)
        self.prev_x0 = x0
        return out


class LCMSolver(Solver):
    """LCM / consistency sampling: jump to the x0 prediction, then re-noise it to σ[i+1] with fresh
    noise (what step-distilled LoRAs are trained for)."""

    stochastic = True

    def _update(self, v, x):
        s_next = self.sigmas[self.index + 1]
        x0 = self.denoised(v, x)
        if s_next <= 0.0:
            return x0
        return (1.0 - s_next) * x0 + s_next * self._fresh_noise(x)


class _LambdaSDESolver(Solver):
    """The step the DPM-Solver++ SDE family shares, in λ = log(α/σ) with eta 1 and h = λ' − λ:
    x' = (σ'/σ)e^{−h}x + α'(1 − e^{−2h})x0 + [the solver's history terms] + σ'√(1 − e^{−2h})·z;
    the step to σ = 0 returns x0. Subclasses add their history terms and keep what they need."""

    stochastic = True

    def _update(self, v, x):
        s, s_next = self.sigmas[self.index], self.sigmas[self.index + 1]
        x0 = self.denoised(v, x)
        if s_next <= 0.0:
            out = x0
        else:
            h = _lambda(s_next) - _lambda(s)
            alpha_next = 1.0 - s_next
            weight = -math.expm1(-2.0 * h)
            out = (s_next / s) * math.exp(-h) * x + alpha_next * weight * x0
            out = self._history_terms(out, x0, h, alpha_next, weight)
            out = out + s_next * math.sqrt(weight) * self._fresh_noise(x)
            self._remember_h(h)
        self._remember_x0(x0)
        return out

    def _history_terms(self, out, x0, h: float, alpha_next: float, weight: float):
        raise NotImplementedError

    def _remember_h(self, h: float) -> None:
        raise NotImplementedError

    def _remember_x0(self, x0) -> None:
        raise NotImplementedError


class DPMPPSDESolver(_LambdaSDESolver):
    """DPM-Solver++(2M) SDE (eta 1, midpoint), data prediction in λ = log(α/σ):
    x' = (σ'/σ)e^{−h}x + α'(1 − e^{−2h})x0 [+ ½α'(1 − e^{−2h})(x0 − x0_prev)/r] + σ'√(1 − e^{−2h})·z."""

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self.prev_x0: torch.Tensor | None = None
        self.prev_h: float | None = None

    def _history_terms(self, out, x0, h, alpha_next, weight):
        if self.prev_x0 is not None:
            r = self.prev_h / h
            out = out + 0.5 * alpha_next * weight * (x0 - self.prev_x0) / r
        return out

    def _remember_h(self, h):
        self.prev_h = h

    def _remember_x0(self, x0):
        self.prev_x0 = x0


def _er_noise_scaler(lam: float) -> float:
    return lam * (math.exp(lam ** 0.3) + 10.0)


class ERSDESolver(Solver):
    """Extended reverse-time SDE solver, 3 stages (Cui et al. 2023, ER-SDE-Solver-3, as ComfyUI's
    er_sde), in λ_er = σ/α with the noise scaler λ(e^{λ^0.3} + 10); the integrals of the higher
    stages by the 200-point rule the reference uses."""

    stochastic = True
    MAX_STAGE = 3
    POINTS = 200

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self.prev_x0: torch.Tensor | None = None
        self.prev_d: torch.Tensor | None = None
        self.lams: list[float] = []   # λ_er of the previous steps (newest last)

    def _update(self, v, x):
        i = self.index
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self.denoised(v, x)
        lam = s / (1.0 - s)
        if s_next <= 0.0:
            out = x0
        else:
            lam_next = s_next / (1.0 - s_next)
            alpha, alpha_next = 1.0 - s, 1.0 - s_next
            r = _er_noise_scaler(lam_next) / _er_noise_scaler(lam)
            out = (alpha_next / alpha) * r * x + alpha_next * (1.0 - r) * x0
            stage = min(self.MAX_STAGE, len(self.lams) + 1)
            if stage >= 2:
                dt = lam_next - lam
                step = -dt / self.POINTS
                pos = [lam_next + k * step for k in range(self.POINTS)]
                scaled = [_er_noise_scaler(p) for p in pos]
                integral = sum(1.0 / q for q in scaled) * step
                d = (x0 - self.prev_x0) / (lam - self.lams[-1])
                out = out + alpha_next * (dt + integral * _er_noise_scaler(lam_next)) * d
                if stage >= 3:
                    integral_u = sum((p - lam) / q for p, q in zip(pos, scaled, strict=True)) * step
                    u = (d - self.prev_d) / ((lam - self.lams[-2]) / 2.0)
                    out = out + alpha_next * (dt ** 2 / 2.0 + integral_u * _er_noise_scaler(lam_next)) * u
                self.prev_d = d
            spread = lam_next ** 2 - lam ** 2 * r ** 2
            out = out + alpha_next * math.sqrt(max(spread, 0.0)) * self._fresh_noise(x)
        self.prev_x0 = x0
        self.lams = (self.lams + [lam])[-2:]
        return out


class DPMPP3MSDESolver(_LambdaSDESolver):
    """DPM-Solver++(3M) SDE (eta 1), data prediction in λ = log(α/σ), as k-diffusion's dpmpp_3m_sde:
    with h = λ' − λ, η-scaled ĥ = 2h and φ₂ = (e^{−ĥ} − 1)/ĥ + 1, φ₃ = φ₂/ĥ − ½,
    x' = (σ'/σ)e^{−h}x + α'(1 − e^{−ĥ})x0 + α'φ₂·D1 − α'φ₃·D2 + σ'√(1 − e^{−2h})·z,
    D1, D2 the first and second divided differences of the last three x0 (r₀ = h₋₁/h, r₁ = h₋₂/h):
    d₀ = (x0 − x0₋₁)/r₀, d₁ = (x0₋₁ − x0₋₂)/r₁, D1 = d₀ + (d₀ − d₁)·r₀/(r₀ + r₁), D2 = (d₀ − d₁)/(r₀ + r₁);
    with two x0 known only α'φ₂·d₀, with one neither. The step to σ = 0 returns x0."""

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self.x0s: list[torch.Tensor] = []    # previous x0 predictions, newest last (at most 2)
        self.hs: list[float] = []            # their steps' h, newest last

    def _history_terms(self, out, x0, h, alpha_next, weight):
        h_eta = 2.0 * h
        phi2 = math.expm1(-h_eta) / h_eta + 1.0
        if len(self.x0s) == 2:
            r0, r1 = self.hs[-1] / h, self.hs[-2] / h
            d0 = (x0 - self.x0s[-1]) / r0
            d1 = (self.x0s[-1] - self.x0s[-2]) / r1
            first = d0 + (d0 - d1) * (r0 / (r0 + r1))
            second = (d0 - d1) / (r0 + r1)
            phi3 = phi2 / h_eta - 0.5
            out = out + (alpha_next * phi2) * first - (alpha_next * phi3) * second
        elif len(self.x0s) == 1:
            out = out + (alpha_next * phi2) * ((x0 - self.x0s[-1]) / (self.hs[-1] / h))
        return out

    def _remember_h(self, h):
        self.hs = (self.hs + [h])[-2:]

    def _remember_x0(self, x0):
        self.x0s = (self.x0s + [x0])[-2:]
