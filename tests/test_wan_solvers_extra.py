"""The added Wan solvers and schedules against float64 references written from their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from slipstream.models.wan import schedules
from slipstream.models.wan.sampling import SCHEDULERS, Schedule, make_schedule, make_solver

MU, S = 0.7, 0.5


def _x0(x, sigma):
    """The exact x0 prediction of a Gaussian data distribution N(MU, S²) under the flow."""
    var = (1 - sigma) ** 2 * S ** 2 + sigma ** 2
    return MU + (1 - sigma) * S ** 2 / var * (x - (1 - sigma) * MU)


def _velocity(x, sigma):
    return (x - _x0(x, sigma)) / sigma


def _noises(steps, n=6):
    g = torch.Generator().manual_seed(11)
    return [torch.randn(n, dtype=torch.float64, generator=g) for _ in range(steps + 1)]


def _run_ours(name, sigmas, noises):
    solver = make_solver(name, Schedule(tuple(sigmas), tuple(s * 1000 for s in sigmas[:-1])))
    queue = list(noises[1:])
    solver.noise = lambda like: queue.pop(0)
    x = noises[0].clone()
    for i in range(len(sigmas) - 1):
        x = solver.step(_velocity(x, sigmas[i]), x)
    return x


SIGMAS = [0.999, 0.93, 0.8, 0.62, 0.41, 0.22, 0.08, 0.0]


def test_dpmpp_2m_sde_matches_its_formula():
    noises = _noises(len(SIGMAS))
    x, prev, prev_h = noises[0].clone(), None, None
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    for i in range(len(SIGMAS) - 1):
        s, t = SIGMAS[i], SIGMAS[i + 1]
        x0 = _x0(x, s)
        if t == 0:
            x = x0
        else:
            h = lam(t) - lam(s)
            w = 1 - math.exp(-2 * h)
            new = (t / s) * math.exp(-h) * x + (1 - t) * w * x0
            if prev is not None:
                new = new + 0.5 * (1 - t) * w * (h / prev_h) * (x0 - prev)
            x = new + t * math.sqrt(w) * noises[i + 1]
            prev_h = h
        prev = x0
    assert torch.allclose(_run_ours("dpm++_sde", SIGMAS, noises), x, atol=1e-12)


def test_dpmpp_3m_sde_matches_its_formula():
    """Reference from the 3M SDE update with η = 1 written over the whole history: exponential
    integrator in λ = log(α/σ), e^{-2h} decay, and the x0 history's divided differences weighted by
    φ₂(ĥ) = (e^{-ĥ} − 1)/ĥ + 1 and φ₃ = φ₂/ĥ − ½ (ĥ = 2h)."""
    noises = _noises(len(SIGMAS))
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    x, x0s, hs = noises[0].clone(), [], []
    for i in range(len(SIGMAS) - 1):
        s, t = SIGMAS[i], SIGMAS[i + 1]
        x0 = _x0(x, s)
        if t == 0:
            x = x0
        else:
            h = lam(t) - lam(s)
            hh = 2 * h
            phi2 = (math.exp(-hh) - 1) / hh + 1
            new = (t / s) * math.exp(-h) * x + (1 - t) * (1 - math.exp(-hh)) * x0
            if len(x0s) >= 2:
                r0, r1 = hs[-1] / h, hs[-2] / h
                d0, d1 = (x0 - x0s[-1]) / r0, (x0s[-1] - x0s[-2]) / r1
                new = new + (1 - t) * phi2 * (d0 + (d0 - d1) * r0 / (r0 + r1)) \
                    - (1 - t) * (phi2 / hh - 0.5) * (d0 - d1) / (r0 + r1)
            elif x0s:
                new = new + (1 - t) * phi2 * (x0 - x0s[-1]) * h / hs[-1]
            x = new + t * math.sqrt(1 - math.exp(-2 * h)) * noises[i + 1]
            hs.append(h)
        x0s.append(x0)
    assert torch.allclose(_run_ours("dpm++_3m_sde", SIGMAS, noises), x, atol=1e-12)


def test_lcm_renoises_the_x0_prediction():
    noises = _noises(len(SIGMAS))
    x = noises[0].clone()
    for i in range(len(SIGMAS) - 1):
        t = SIGMAS[i + 1]
        x = (1 - t) * _x0(x, SIGMAS[i]) + t * noises[i + 1] if t > 0 else _x0(x, SIGMAS[i])
    assert torch.allclose(_run_ours("lcm", SIGMAS, noises), x, atol=1e-12)


def test_deis_matches_polynomial_integration_in_tau():
    noises = _noises(len(SIGMAS))
    x, taus, x0s = noises[0].clone().numpy(), [], []
    for i in range(len(SIGMAS) - 1):
        s, t = SIGMAS[i], SIGMAS[i + 1]
        x0 = _x0(torch.from_numpy(x), s).numpy()
        taus, x0s = (taus + [(1 - s) / s])[-3:], (x0s + [x0])[-3:]
        if t == 0:
            x = x0
            continue
        tau, tau_next = taus[-1], (1 - t) / t
        u = x / s
        for k in range(x.size):     # fit the x0 history exactly and integrate it (numpy polynomials)
            poly = np.polyint(np.polyfit(taus, [v[k] for v in x0s], len(taus) - 1))
            u[k] += np.polyval(poly, tau_next) - np.polyval(poly, tau)
        x = t * u
    assert np.allclose(_run_ours("deis", SIGMAS, noises).numpy(), x, atol=1e-9)


def test_res_multistep_matches_its_formula():
    sigmas = [1.0] + SIGMAS[1:]
    noises = _noises(len(sigmas))
    x, prev = noises[0].clone(), None
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        x0 = _x0(x, s) if s < 1 else MU + 0 * x    # at σ = 1 the prediction is the data mean
        if t == 0 or prev is None:
            x = x + (t - s) * (x - x0) / s
        else:
            h = -math.log(t) + math.log(s)
            c2 = (-math.log(sigmas[i - 1]) + math.log(s)) / h
            phi1 = (math.exp(-h) - 1) / -h
            phi2 = (phi1 - 1) / -h
            x = math.exp(-h) * x + h * ((phi1 - phi2 / c2) * x0 + (phi2 / c2) * prev)
        prev = x0
    ours = make_solver("res_multistep", Schedule(tuple(sigmas), tuple(v * 1000 for v in sigmas[:-1])))
    y = noises[0].clone()
    for i in range(len(sigmas) - 1):
        v = (y - MU) if sigmas[i] >= 1 else _velocity(y, sigmas[i])
        y = ours.step(v, y)
    assert torch.allclose(y, x, atol=1e-12)


def test_er_sde_matches_its_formula():
    noises = _noises(len(SIGMAS))
    scaler = lambda v: v * (math.exp(v ** 0.3) + 10.0)  # noqa: E731
    x, old, old_d, lams = noises[0].clone(), None, None, []
    for i in range(len(SIGMAS) - 1):
        s, t = SIGMAS[i], SIGMAS[i + 1]
        x0 = _x0(x, s)
        ls = s / (1 - s)
        if t == 0:
            x = x0
        else:
            lt = t / (1 - t)
            r = scaler(lt) / scaler(ls)
            x = ((1 - t) / (1 - s)) * r * x + (1 - t) * (1 - r) * x0
            stage = min(3, i + 1)
            if stage >= 2:
                dt = lt - ls
                pts = [lt + k * (-dt / 200) for k in range(200)]
                integral = sum(1 / scaler(p) for p in pts) * (-dt / 200)
                d = (x0 - old) / (ls - lams[-1])
                x = x + (1 - t) * (dt + integral * scaler(lt)) * d
                if stage >= 3:
                    integral_u = sum((p - ls) / scaler(p) for p in pts) * (-dt / 200)
                    u = (d - old_d) / ((ls - lams[-2]) / 2)
                    x = x + (1 - t) * (dt ** 2 / 2 + integral_u * scaler(lt)) * u
                old_d = d
            x = x + (1 - t) * math.sqrt(max(lt ** 2 - ls ** 2 * r ** 2, 0.0)) * noises[i + 1]
        old = x0
        lams.append(ls)
    assert torch.allclose(_run_ours("er_sde", SIGMAS, noises), x, atol=1e-10)


def test_sde_solvers_sample_the_data_distribution():
    """With fresh noise every step the SDE solvers still land on the data distribution's statistics
    (LCM does not: it re-noises posterior means, which is what consistency-distilled models expect)."""
    for name in ("dpm++_sde", "er_sde", "dpm++_3m_sde"):
        schedule = make_schedule(name, 40, 1.0)
        g = torch.Generator().manual_seed(0)
        solver = make_solver(name, schedule)
        solver.noise = lambda like, g=g: torch.randn(like.shape, generator=g, dtype=like.dtype)
        x = torch.randn(20000, dtype=torch.float64, generator=g)
        for i in range(schedule.steps):
            x = solver.step(_velocity(x, schedule.sigmas[i]), x)
        assert abs(x.mean().item() - MU) < 0.03 and abs(x.std().item() - S) < 0.05, name


def test_distill_and_causvid_schedules():
    distill = make_schedule("flowmatch_distill", 4, 5.0)
    raw = [1 - (1000 - t) / 1000 for t in (999, 750, 500, 250)]
    assert distill.sigmas == tuple(5 * r / (1 + 4 * r) for r in raw) + (0.0,)
    causvid = make_schedule("flowmatch_causvid", 4, 5.0, dim=1536)
    assert causvid.sigmas == (1.0, 0.75, 0.5, 0.25, 0.0)
    assert make_schedule("flowmatch_causvid", 9, 5.0, dim=5120).timesteps[:3] == (999.0, 934.0, 862.0)
    with pytest.raises(ValueError, match="4-step schedule"):
        make_schedule("flowmatch_distill", 6, 5.0)


def test_beta_schedule():
    assert schedules.beta_cdf(0.5, 0.6, 0.6) == pytest.approx(0.5, abs=1e-12)
    # I_x(1, 1) = x and I_x(2, 1) = x²: closed forms of the incomplete beta function
    assert schedules.beta_cdf(0.3, 1.0, 1.0) == pytest.approx(0.3, abs=1e-12)
    assert schedules.beta_cdf(0.3, 2.0, 1.0) == pytest.approx(0.09, abs=1e-12)
    p = schedules.beta_ppf(0.8, 0.6, 0.6)
    assert schedules.beta_cdf(p, 0.6, 0.6) == pytest.approx(0.8, abs=1e-12)
    beta = make_schedule("unipc/beta", 10, 1.0)
    gaps = np.diff(beta.sigmas)
    assert all(g < 0 for g in gaps)
    assert abs(gaps[0]) < abs(gaps[4]) and abs(gaps[-2]) < abs(gaps[4]), "dense at both ends"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_menu_entry_builds_a_descending_schedule(name):
    schedule = make_schedule(name, 4, 5.0)
    assert schedule.sigmas[-1] == 0.0 and all(b < a for a, b in zip(schedule.sigmas, schedule.sigmas[1:], strict=False))
    make_solver(name, schedule)
