"""Flow-matching schedules and solvers, context-window schedules and fusing, FreeNoise, FETA math."""

from __future__ import annotations

import math

import pytest
import torch
from slipstream.models.wan.context import (
    ContextOptions,
    WindowFuser,
    context_windows,
    freenoise,
    ordered_halving,
    window_weights,
)
from slipstream.models.wan.feta import FetaArgs, enhance_score
from slipstream.models.wan.sampling import DETERMINISTIC, make_schedule, make_solver

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- schedules (official UniPC timesteps)

UNIPC_30_5 = [999, 992, 985, 978, 969, 961, 952, 942, 931, 920, 908, 895, 882, 867, 850, 833, 813, 792, 768, 742,
              713, 681, 644, 603, 555, 499, 434, 356, 262, 146]
UNIPC_50_5 = [999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890,
              882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584,
              555, 522, 487, 448, 405, 356, 302, 241, 172, 92]
UNIPC_40_3 = [999, 991, 982, 973, 963, 954, 944, 933, 922, 911, 899, 887, 874, 861, 847, 832, 817, 801, 785, 767,
              749, 730, 710, 688, 666, 642, 617, 590, 562, 531, 499, 465, 428, 388, 345, 299, 249, 195, 136, 71]


@pytest.mark.parametrize("steps,shift,expected", [(30, 5.0, UNIPC_30_5), (50, 5.0, UNIPC_50_5), (40, 3.0, UNIPC_40_3)])
def test_unipc_timesteps_match_the_official_scheduler(steps, shift, expected):
    schedule = make_schedule("unipc", steps, shift)
    assert [int(t) for t in schedule.timesteps] == expected
    assert schedule.sigmas[-1] == 0.0 and len(schedule.sigmas) == steps + 1


def test_schedule_shapes_and_denoise():
    euler = make_schedule("euler", 10, 5.0)
    assert euler.sigmas[0] == 1.0 and euler.timesteps[0] == 1000.0
    full = make_schedule("dpm++", 20, 5.0)
    half = make_schedule("dpm++", 10, 5.0, denoise=0.5)
    assert half.steps == 10 and half.sigmas == full.sigmas[10:]
    with pytest.raises(ValueError, match="scheduler"):
        make_schedule("ddim", 10, 5.0)
    with pytest.raises(ValueError, match="denoise"):
        make_schedule("euler", 10, 5.0, denoise=0.0)


def _gaussian_flow(seed=0):
    """Data N(mu, s²): the exact velocity field and the exact ODE end point of a noise sample."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.5
    s = torch.rand(4, 8, generator=g, dtype=torch.float64) + 0.3
    eps = torch.randn(4, 8, generator=g, dtype=torch.float64)

    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * s ** 2 + sigma ** 2
        mean_x0 = mu + (1 - sigma) * s ** 2 / var * (x - (1 - sigma) * mu)
        return (x - mean_x0) / sigma

    return velocity, eps, mu + s * eps


def _integrate(name, steps, shift, velocity, x):
    schedule = make_schedule(name, steps, shift)
    solver = make_solver(name, schedule)
    for i in range(steps):
        x = solver.step(velocity(x, schedule.sigmas[i]), x)
    return x


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_solvers_land_exactly_on_a_point_mass(name):
    target = torch.linspace(-1, 1, 12, dtype=torch.float64)
    noise = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = _integrate(name, 7, 5.0, lambda x, sigma: (x - target) / sigma, noise)
    assert torch.allclose(out, target, atol=1e-9)


def test_solvers_converge_and_multistep_beats_euler():
    velocity, eps, exact = _gaussian_flow()
    errors = {(n, k): (_integrate(n, k, 1.0, velocity, eps.clone()) - exact).abs().max().item()
              for n in DETERMINISTIC for k in (20, 80)}
    for n in DETERMINISTIC:
        assert errors[n, 80] < errors[n, 20] and errors[n, 80] < 0.05
    assert errors["unipc", 20] < errors["euler", 20] / 5
    assert errors["dpm++", 20] < errors["euler", 20] / 5
    assert errors["unipc", 80] < errors["euler", 80] / 5


# ---------------------------------------------------------------- context windows (spec worked examples)


def _ranges(windows):
    out = []
    for w in windows:
        if w == list(range(w[0], w[-1] + 1)):
            out.append((w[0], w[-1]))
        else:
            out.append(tuple(w))
    return out


def test_ordered_halving():
    assert [ordered_halving(i) for i in range(6)] == [0, 0.5, 0.25, 0.75, 0.125, 0.625]


def test_context_options_convert_pixel_frames():
    assert ContextOptions(frames=81, stride=4, overlap=16).latent() == (21, 1, 4)
    assert ContextOptions(frames=161, stride=8, overlap=30).latent() == (41, 2, 7)
    with pytest.raises(ValueError, match="schedule"):
        ContextOptions(schedule="random")


def test_static_standard_windows():
    assert _ranges(context_windows("static_standard", 0, 41, 21, 1, 4)) == [(0, 20), (17, 37), (20, 40)]
    assert context_windows("static_standard", 5, 41, 21, 1, 4) == context_windows("static_standard", 0, 41, 21, 1, 4)
    assert context_windows("static_standard", 0, 15, 21, 1, 4) == [list(range(15))]


def test_uniform_standard_windows_rotate_per_step():
    expected = {0: [(0, 20), (17, 37), (20, 40)],
                1: [(20, 40), (0, 20), (13, 33)],
                2: [(10, 30), (20, 40), (0, 20), (3, 23)],
                3: [(20, 40), (0, 20), (7, 27)]}
    for step, windows in expected.items():
        assert _ranges(context_windows("uniform_standard", step, 41, 21, 1, 4)) == windows, step


def test_uniform_looped_windows_wrap():
    step0 = context_windows("uniform_looped", 0, 41, 21, 1, 4)
    assert _ranges(step0[:2]) == [(0, 20), (17, 37)]
    assert step0[2] == list(range(34, 41)) + list(range(0, 14))
    step1 = context_windows("uniform_looped", 1, 41, 21, 1, 4)
    assert _ranges([step1[0], step1[2]]) == [(20, 40), (13, 33)]
    assert step1[1] == list(range(37, 41)) + list(range(0, 17))


def test_uniform_standard_stride_two_adds_dilated_windows():
    windows = context_windows("uniform_standard", 0, 61, 21, 2, 4)
    contiguous = [w for w in windows if w == list(range(w[0], w[-1] + 1))]
    assert windows[:len(contiguous)] == contiguous, "dilated windows come after the contiguous ones"
    assert list(range(0, 41, 2)) in windows and list(range(20, 61, 2)) in windows
    covered = set().union(*map(set, windows))
    assert covered == set(range(61))


def test_linear_and_pyramid_weights():
    first = window_weights(list(range(0, 21)), 41, 4)
    assert torch.equal(first[:17], torch.ones(17)) and torch.allclose(first[17:], torch.linspace(1, 0, 4))
    middle = window_weights(list(range(17, 38)), 41, 4)
    assert torch.allclose(middle[:4], torch.linspace(0, 1, 4)) and torch.allclose(middle[-4:], torch.linspace(1, 0, 4))
    assert torch.equal(window_weights(list(range(41)), 41, 4), torch.ones(41))
    pyramid = window_weights(list(range(17, 24)), 41, 2, "pyramid")
    assert torch.allclose(pyramid, torch.tensor([1, 2, 3, 4, 3, 2, 1]) / 4)
    edge = window_weights(list(range(0, 6)), 41, 3, "pyramid")
    assert torch.allclose(edge, torch.tensor([1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3]).maximum(
        torch.cat([torch.linspace(0, 1, 3), torch.zeros(3)])))


def test_fuser_single_full_window_is_exact_and_overlaps_average():
    pred = torch.randn(2, 16, 9, 4, 4)
    fuser = WindowFuser(pred, frame_dim=2)
    window = list(range(9))
    fuser.add(window, pred, window_weights(window, 9, 2))
    assert torch.equal(fuser.result(), pred)

    fuser = WindowFuser(pred, frame_dim=2)
    a, b = list(range(0, 6)), list(range(3, 9))
    fuser.add(a, pred[:, :, a], window_weights(a, 9, 3))
    fuser.add(b, pred[:, :, b] + 1.0, window_weights(b, 9, 3))
    out = fuser.result()
    assert torch.equal(out[:, :, :3], pred[:, :, :3])
    assert torch.allclose(out[:, :, 4], pred[:, :, 4] + 0.5, atol=1e-6), "equal ramps meet halfway"
    assert torch.allclose(out[:, :, 3], pred[:, :, 3]) and torch.allclose(out[:, :, 5], pred[:, :, 5] + 1.0, atol=1e-6)
    fuser = WindowFuser(pred, frame_dim=2)
    fuser.add(a, pred[:, :, a], window_weights(a, 9, 3))
    with pytest.raises(RuntimeError, match="uncovered"):
        fuser.result()


def test_fuser_zero_weight_frames_fall_back_to_plain_mean():
    pred = torch.randn(1, 2, 5, 1, 1)
    fuser = WindowFuser(pred, frame_dim=2)
    fuser.add([0, 1, 2], pred[:, :, :3], torch.tensor([1.0, 1.0, 0.0]))
    fuser.add([2, 3, 4], pred[:, :, 2:] * 3, torch.tensor([0.0, 1.0, 1.0]))
    assert torch.allclose(fuser.result()[:, :, 2], pred[:, :, 2] * 2)


def test_freenoise_reuses_shuffled_earlier_frames():
    noise = torch.arange(10.0).view(1, 10, 1, 1).expand(2, 10, 3, 3).clone()
    out = freenoise(noise, size=4, overlap=2, generator=torch.Generator().manual_seed(0), frame_dim=1)
    frames = out[0, :, 0, 0].tolist()
    assert frames[:4] == [0, 1, 2, 3]
    assert sorted(frames[4:6]) == [0, 1] and sorted(frames[6:8]) == sorted(frames[2:4])
    assert sorted(frames[8:10]) == sorted(frames[4:6])
    again = freenoise(noise, size=4, overlap=2, generator=torch.Generator().manual_seed(0), frame_dim=1)
    assert torch.equal(out, again)
    assert torch.equal(freenoise(noise, 12, 2, torch.Generator(), 1), noise)


# ---------------------------------------------------------------- FETA


def test_enhance_score_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)   # frame 0, frame 1; one position, one head
    k = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(1, 2, 1, 2)
    a01 = 0.5                                                      # q0·k0 = q0·k1 = 1: equal logits
    a10 = 1.0 / (1.0 + math.exp(1.0 / math.sqrt(2.0)))             # q1·k0 = 0, q1·k1 = 1
    mean_off = (a01 + a10) / (2 * 2 - 2)
    assert enhance_score(q, k, 2, 2.0).item() == pytest.approx(mean_off * 4.0, rel=1e-6)
    assert enhance_score(q, k, 2, 0.0).item() == 1.0, "clamped at 1"
    batch = enhance_score(torch.cat([q, q * 0]), torch.cat([k, k]), 2, 2.0)
    assert batch.shape == (2,) and batch[1].item() == pytest.approx(max(1.0, 0.5 * 4.0))


def test_feta_enable_window():
    args = FetaArgs(weight=2.0, start_percent=0.2, end_percent=0.5)
    assert [args.active_at(i, 10) for i in range(10)] == [False, False, True, True, True, True] + [False] * 4
    assert not FetaArgs(weight=0.0).active_at(0, 10)
