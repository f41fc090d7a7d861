"""Wan sampler step ranges, SIGMAS, add_noise, the denoised output, the A14B two-expert switch and the
sampler's bad-input checks, on tiny random-weight DiTs."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from slipstream.models.wan import config as wan_config
from slipstream.models.wan.dit import WanDiT
from slipstream.models.wan.experts import expert_variant, plan_experts
from slipstream.models.wan.pipeline import (
    NonFiniteError,
    RunStats,
    SamplerSettings,
    WanImageEmbeds,
    WanModelHandle,
    sample_video,
    sample_video_full,
)
from slipstream.models.wan.sampling import DETERMINISTIC, make_schedule

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from wan_sampler_fixtures import CPU, TEXT_DIM, tiny_handle, tiny_text

pytestmark = pytest.mark.usefixtures("single_thread")



_handle = tiny_handle
_text = tiny_text


IMAGE = WanImageEmbeds(32, 32, 5)


def _full(handle, settings, **kw):
    return sample_video_full(handle, _text(), IMAGE, settings, device=CPU, **kw)


@pytest.mark.parametrize("scheduler", DETERMINISTIC)
def test_two_stage_run_equals_one_run(scheduler):
    handle = _handle()
    base = dict(steps=5, cfg=4.0, shift=5.0, seed=3, scheduler=scheduler)
    single = _full(handle, SamplerSettings(**base))
    first = _full(handle, SamplerSettings(**base, end_step=2))
    assert first.resume is not None and first.resume["step"] == 2
    second = _full(handle, SamplerSettings(**base, start_step=2, add_noise=False), samples=first.latent,
                   resume=first.resume)
    assert torch.equal(second.latent, single.latent)
    assert torch.equal(second.denoised, single.denoised)
    assert not torch.equal(first.latent, single.latent), "the first stage stops with noise left"


def test_denoised_output_is_the_last_x0_and_equals_the_latent_at_the_end():
    handle = _handle()
    result = _full(handle, SamplerSettings(steps=3, cfg=4.0, scheduler="euler"))
    # Euler's last step goes to σ = 0, where x = x0.
    assert torch.allclose(result.denoised, result.latent, atol=1e-5)
    partial = _full(handle, SamplerSettings(steps=3, cfg=4.0, scheduler="euler", end_step=1))
    assert not torch.allclose(partial.denoised, partial.latent, atol=1e-3)


def test_sigmas_input_replaces_the_schedule_and_splits_like_core_split_sigmas():
    handle = _handle()
    sigmas = (1.0, 0.9, 0.7, 0.4, 0.15, 0.0)
    stats = RunStats()
    whole = _full(handle, SamplerSettings(steps=99, cfg=3.0, scheduler="euler", sigmas=sigmas), stats=stats)
    assert stats.forwards == 5 and stats.batched_cfg
    own = _full(handle, SamplerSettings(steps=5, cfg=3.0, scheduler="euler"))
    assert not torch.allclose(whole.latent, own.latent)
    # core SplitSigmas at 2: high part (1.0, 0.9, 0.7), low part (0.7, ..., 0.0)
    high = _full(handle, SamplerSettings(steps=99, cfg=3.0, scheduler="euler", sigmas=sigmas[:3]))
    low = _full(handle, SamplerSettings(steps=99, cfg=3.0, scheduler="euler", sigmas=sigmas[2:], add_noise=False),
                samples=high.latent)
    assert torch.allclose(low.latent, whole.latent, atol=1e-5)
    with pytest.raises(ValueError, match="past the 5 steps the SIGMAS input holds"):
        _full(handle, SamplerSettings(steps=4, scheduler="euler", sigmas=sigmas, end_step=6))
    with pytest.raises(ValueError, match="start_step 5 is past the 5 steps the SIGMAS input holds"):
        _full(handle, SamplerSettings(steps=4, scheduler="euler", sigmas=sigmas, start_step=5))
    with pytest.raises(ValueError, match="descending"):
        _full(handle, SamplerSettings(steps=4, scheduler="euler", sigmas=(0.2, 0.5, 0.0)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        _full(handle, SamplerSettings(steps=4, scheduler="euler", sigmas=(14.6, 3.0, 0.0)))


def test_add_noise_noises_the_input_to_the_start_sigma():
    handle = _handle()
    latent = torch.randn(1, *IMAGE.latent_shape, generator=torch.Generator().manual_seed(5))
    settings = SamplerSettings(steps=4, cfg=1.0, scheduler="euler", start_step=3)
    noised = _full(handle, settings, samples=latent)
    kept = _full(handle, replace(settings, add_noise=False), samples=latent)
    assert not torch.allclose(noised.latent, kept.latent)
    with pytest.raises(ValueError, match="add_noise off needs a noisy latent"):
        _full(handle, replace(settings, add_noise=False))


# ------------------------------------------------------------------------------------------ A14B experts


def test_official_boundary_and_cfg_per_variant():
    timesteps = make_schedule("unipc", 10, 12.0).timesteps
    plan = plan_experts("t2v", timesteps, 4.0)
    assert plan.high_steps == tuple(t >= 875 for t in timesteps)
    assert (plan.high_cfg, plan.low_cfg) == (4.0, 3.0)
    i2v = plan_experts("i2v", timesteps, 3.5)
    assert i2v.high_steps == tuple(t >= 900 for t in timesteps) and i2v.low_cfg == 3.5
    assert expert_variant(wan_config.tiny("i2v")) == "i2v" and expert_variant(wan_config.tiny("t2v")) == "t2v"
    with pytest.raises(ValueError, match="boundary must be"):
        plan_experts("t2v", timesteps, 4.0, boundary=1.5)


def test_two_experts_switch_at_the_boundary_and_the_idle_one_leaves_the_device():
    compute = torch.device("cpu", 0)      # compares unequal to the resident "cpu": moves are observable
    high, low = _handle(seed=1, name="high"), _handle(seed=2, name="low")
    where = {"high": "cpu", "low": "cpu"}
    ran: list[tuple[str, str]] = []

    def spy(handle):
        dit, name = handle.dit, handle.name
        original_to, original_forward = dit.to, dit.forward

        def to(device, *a, **k):
            where[name] = str(torch.device(device))
            return original_to(device, *a, **k)

        def forward(*a, **k):
            other = "low" if name == "high" else "high"
            ran.append((name, where[other]))
            return original_forward(*a, **k)
        dit.to, dit.forward = to, forward

    spy(high)
    spy(low)
    stats = RunStats()
    settings = SamplerSettings(steps=6, cfg=4.0, shift=5.0, seed=1, batched_cfg="on")
    sample_video_full(high, _text(), IMAGE, settings, device=compute, low_noise=low, stats=stats)
    timesteps = make_schedule("unipc", 6, 5.0).timesteps
    expected = ["high" if t >= 875 else "low" for t in timesteps]
    assert stats.experts == expected and "high" in expected and "low" in expected
    assert [name for name, _ in ran] == expected
    assert all(other == "cpu" for _, other in ran), "the idle expert stayed on the compute device"
    assert where == {"high": "cpu", "low": "cpu"}, "force_offload puts both back"


def test_two_experts_with_two_samplers_equal_one_sampler():
    high, low = _handle(seed=1), _handle(seed=2)
    settings = SamplerSettings(steps=6, cfg=4.0, shift=5.0, seed=1, scheduler="euler")
    switch = sum(t >= 875 for t in make_schedule("euler", 6, 5.0).timesteps)
    one = _full(high, settings, low_noise=low)
    first = _full(high, replace(settings, end_step=switch))
    second = _full(low, replace(settings, start_step=switch, add_noise=False, cfg=3.0), samples=first.latent,
                   resume=first.resume)
    assert torch.equal(one.latent, second.latent)


def test_a_low_noise_expert_of_another_family_is_refused():
    cfg = replace(wan_config.tiny("t2v", num_layers=2, text_dim=TEXT_DIM), text_len=16, dim=128, ffn_dim=256, num_heads=1)
    other = WanModelHandle(WanDiT(cfg).eval(), "other", CPU)
    with pytest.raises(ValueError, match="not of the same family"):
        _full(_handle(), SamplerSettings(steps=2), low_noise=other)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="shift must be a finite number"):
        SamplerSettings(shift=math.nan)
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        SamplerSettings(cfg=math.nan)
    handle = _handle()
    latent = torch.zeros(2, *IMAGE.latent_shape)
    with pytest.raises(ValueError, match="runs past 2\\^64-1"):
        _full(handle, SamplerSettings(steps=1, seed=2 ** 64 - 1), samples=latent)
    with pytest.raises(ValueError, match="leave no step to run"):
        _full(handle, SamplerSettings(steps=3, start_step=3))
    nan = torch.full((1, *IMAGE.latent_shape), math.nan)
    with pytest.raises(ValueError, match="NaN or inf"):
        _full(handle, SamplerSettings(steps=2, denoise=0.5), samples=nan)


def test_sampling_stops_at_the_first_non_finite_step():
    handle = _handle()
    with torch.no_grad():
        handle.dit.blocks[1].ffn[2].weight.fill_(math.inf)
    calls = []
    with pytest.raises(NonFiniteError, match="step 1 of 3"):
        sample_video(handle, _text(), IMAGE, SamplerSettings(steps=3), device=CPU,
                     progress=lambda v, t: calls.append(v))
    assert calls == [], "stopped before reporting the broken step as done"
