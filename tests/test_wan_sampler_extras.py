"""Step caches, Skip Layer Guidance and CFG-Zero*: decisions against hand-computed distances, guidance
against the papers' formulas, and the caches inside real sampling runs (CFG branches, context
windows, block swap)."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from slipstream.models.wan.cache_tables import MAG_RATIOS, TEACACHE_COEFFICIENTS
from slipstream.models.wan.context import ContextOptions
from slipstream.models.wan.guidance import GuidanceArgs, SLGArgs, combine, parse_blocks, parse_cfg_list
from slipstream.models.wan.pipeline import (
    RunStats,
    SamplerSettings,
    SamplingExtras,
    SwapSettings,
    WanImageEmbeds,
    initial_noise,
    sample_video,
)
from slipstream.models.wan.step_cache import CacheArgs, StepCache
from slipstream.models.wan.vae import denormalize_latent

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from wan_sampler_fixtures import CPU, tiny_handle, tiny_text

pytestmark = pytest.mark.usefixtures("single_thread")



def _handle(layers=3, swap=None):
    return tiny_handle(layers, swap=swap)


_text = tiny_text


def _run(handle, settings, image=None, **kw):
    return sample_video(handle, _text(), image or WanImageEmbeds(32, 32, 5), settings, device=CPU, **kw)


# ------------------------------------------------------------------------------ decisions by hand


def _poly(c, r):
    return c[0] * r ** 4 + c[1] * r ** 3 + c[2] * r ** 2 + c[3] * r + c[4]


def test_teacache_accumulates_the_rescaled_relative_l1_distance():
    cache = StepCache(CacheArgs("teacache", 0.3, start_step=1), dim=1536, model_type="t2v", pixels=832 * 480,
                      steps=10)
    c = TEACACHE_COEFFICIENTS["t2v_1.3b"]
    e_prev = torch.full((1, 6, 4), 2.0)
    assert not cache.skip_blocks("k", 0, 0, e_prev)          # first step: computes
    cache.remember_residual("k", torch.ones(3))
    # relative L1 0.02 and 0.03: each polynomial value by hand, summed until it crosses 0.3
    e1 = e_prev * 1.02
    acc = _poly(c, 0.02)
    assert cache.skip_blocks("k", 0, 1, e1) == (acc < 0.3)
    e2 = e1 * 1.03
    acc2 = acc + _poly(c, 0.03) if acc < 0.3 else _poly(c, 0.03)
    assert cache.skip_blocks("k", 0, 2, e2) == (acc2 < 0.3)
    assert cache.states["k"].accumulated == pytest.approx(acc2 if acc2 < 0.3 else 0.0, rel=1e-6)
    assert not cache.skip_blocks("k", 0, 9, e2), "the last step always runs"


def test_magcache_multiplies_calibrated_ratios_and_caps_consecutive_skips():
    steps, thr = 10, 0.12
    cache = StepCache(CacheArgs("magcache", thr, start_step=0, magcache_k=2, retention=0.2), dim=1536,
                      model_type="t2v", pixels=0, steps=steps)
    cond_curve = MAG_RATIOS["t2v_1.3b"][0::2]                # 50 steps, led by the first step's 1.0
    last = len(cond_curve) - 1
    gamma = [cond_curve[int(math.floor(i * last / (steps - 1) + 0.5))] for i in range(steps)]
    e0 = torch.ones(1)
    decisions, ratio, err, run = [], 1.0, 0.0, 0
    for step in range(steps):
        got = cache.skip_blocks("k", 0, step, e0)
        if not got:
            cache.remember_residual("k", torch.zeros(1))
        expected = False
        if step >= 2 and step < steps - 1 and step > 0:   # retention 0.2 of 10 = 2 steps; last always runs
            r = ratio * gamma[step]
            e = err + abs(1 - r)
            if e < thr and run < 2:
                ratio, err, run, expected = r, e, run + 1, True
        if not expected:
            ratio, err, run = 1.0, 0.0, 0
        decisions.append(got)
        assert got == expected, step
    assert any(decisions) and not all(decisions)
    assert cache.report.skipped["cond"] == sum(decisions)


def test_cache_arguments_out_of_range_are_refused():
    for kwargs, message in ((dict(threshold=0.0), "threshold must be in"), (dict(threshold=1.5), "threshold"),
                            (dict(threshold=math.nan), "threshold"), (dict(end_step=1), "end_step"),
                            (dict(method="magcache", threshold=0.1, magcache_k=0), "magcache_k"),
                            (dict(method="nope"), "Unknown cache")):
        with pytest.raises(ValueError, match=message):
            CacheArgs(**{"method": "teacache", "threshold": 0.3, **kwargs})


# ------------------------------------------------------------------------------ caches in a run


@pytest.mark.parametrize("batched", ["off", "on"])
@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_a_cache_skips_forwards_per_branch_and_a_strict_one_changes_nothing(method, batched):
    handle = _handle()
    settings = SamplerSettings(steps=8, cfg=4.0, seed=2, batched_cfg=batched)
    plain = _run(handle, settings)
    strict, loose = RunStats(), RunStats()
    # TeaCache's published polynomial is negative near 0 (as in the reference), so a tiny threshold still
    # skips when e0 barely moves; its strict run closes the window instead.
    start = 100 if method == "teacache" else 1
    same = _run(handle, settings, extras=SamplingExtras(CacheArgs(method, 1e-9, start_step=start)), stats=strict)
    assert strict.cache_skipped == 0 and torch.equal(same, plain)
    fast = _run(handle, settings, extras=SamplingExtras(CacheArgs(method, 1.0, start_step=1, magcache_k=8,
                                                                  retention=0.0)), stats=loose)
    assert loose.cache_skipped > 0 and set(loose.cache_by_branch) <= {"cond", "uncond"}
    assert loose.branches_computed + loose.cache_skipped == 2 * 8 == strict.branches_computed
    assert torch.isfinite(fast).all() and not torch.equal(fast, plain)


def test_caches_work_with_block_swap_and_context_windows():
    settings = SamplerSettings(steps=6, cfg=4.0, seed=2)
    extras = SamplingExtras(CacheArgs("teacache", 1.0, start_step=1))
    plain = _run(_handle(), settings, extras=extras)
    swap = _handle(swap=SwapSettings(blocks_to_swap=2, prefetch_blocks=1))
    assert torch.equal(_run(swap, settings, extras=extras), plain)
    image = WanImageEmbeds(32, 32, 17)                          # 5 latent frames, windows of 3
    stats = RunStats()
    options = ContextOptions("static_standard", 9, 4, 4, freenoise=False)
    out = _run(_handle(), settings, image=image, context=options, extras=extras, stats=stats)
    assert torch.isfinite(out).all() and stats.cache_skipped > 0 and max(stats.windows_per_step) > 1


# ------------------------------------------------------------------------------ SLG and CFG-Zero*


def test_slg_skips_the_blocks_in_the_negative_branch_only():
    handle = _handle()
    text, image = _text(), WanImageEmbeds(32, 32, 5)
    settings = SamplerSettings(steps=1, cfg=4.0, seed=5, scheduler="euler")
    out = _run(handle, settings, extras=SamplingExtras(slg=SLGArgs((1,), 0.0, 1.0)))
    x = initial_noise(image.latent_shape, 5, None)
    t = torch.full((1,), 1000.0)
    dit = handle.dit
    with torch.no_grad():
        cond = dit(x, t, text.positive[0][None])
        uncond = dit(x, t, text.negative[None],
                     block_runner=lambda i, block, tok, inp: tok if i == 1 else block(tok, inp))
    v = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(out, denormalize_latent(x - v), atol=1e-5)
    plain = _run(handle, settings)
    assert not torch.allclose(out, plain, atol=1e-4)
    with pytest.raises(ValueError, match="past the model"):
        _run(handle, settings, extras=SamplingExtras(slg=SLGArgs((3,))))
    assert parse_blocks("8, 9") == (8, 9) and parse_blocks("8-10") == (8, 9, 10)
    with pytest.raises(ValueError, match="block indices like"):
        parse_blocks("nine")


def test_cfg_zero_star_formula_and_zero_init():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g,
                                                                                         dtype=torch.float64)
    for b in range(2):
        c, u = cond[b].flatten(), uncond[b].flatten()
        s = torch.dot(c, u) / torch.dot(u, u)
        expected = s * u + 5.0 * (c - s * u)
        assert torch.allclose(combine(cond, uncond, 5.0, True)[b].flatten(), expected, atol=1e-12)
    assert torch.allclose(combine(cond, uncond, 5.0, False), uncond + 5.0 * (cond - uncond))
    handle = _handle()
    settings = SamplerSettings(steps=2, cfg=4.0, seed=5, scheduler="euler")
    zeroed = _run(handle, replace(settings, steps=1),
                  extras=SamplingExtras(guidance=GuidanceArgs(True, zero_init_steps=1)))
    noise = initial_noise(WanImageEmbeds(32, 32, 5).latent_shape, 5, None)
    assert torch.allclose(zeroed, denormalize_latent(noise), atol=1e-6), "zero velocity leaves the noise"


def test_cfg_per_step_list():
    handle = _handle()
    settings = SamplerSettings(steps=3, cfg=4.0, seed=5, scheduler="euler")
    same = _run(handle, settings, extras=SamplingExtras(guidance=GuidanceArgs(cfg_per_step=(4.0, 4.0, 4.0))))
    assert torch.equal(same, _run(handle, settings))
    assert parse_cfg_list("6, 5,4") == (6.0, 5.0, 4.0) and parse_cfg_list(" ") is None
    with pytest.raises(ValueError, match="has 2 values but the schedule has 3 steps"):
        _run(handle, settings, extras=SamplingExtras(guidance=GuidanceArgs(cfg_per_step=(4.0, 3.0))))
    with pytest.raises(ValueError, match="comma-separated numbers"):
        parse_cfg_list("6;5")


def test_riflex_retunes_one_temporal_frequency_to_under_one_period():
    from slipstream.models.wan.guidance import riflex_cos_sin
    from slipstream.models.wan.layers import rope_angles

    grid, axes, k = (5, 2, 3), (44, 42, 42), 6
    cos, sin = riflex_cos_sin(grid, axes, k, CPU)
    plain = rope_angles(grid, axes, CPU)
    angle = torch.atan2(sin[0, :, 0, k - 1].double(), cos[0, :, 0, k - 1].double()) % (2 * math.pi)
    frames = torch.arange(5, dtype=torch.float64).repeat_interleave(6)
    assert torch.allclose(angle, (frames * 0.9 * 2 * math.pi / 5) % (2 * math.pi), atol=1e-5)
    others = [j for j in range(plain.shape[1]) if j != k - 1]
    assert torch.allclose(cos[0, :, 0, others], torch.cos(plain[:, others]).float())
    with pytest.raises(ValueError, match="between 1 and 22"):
        riflex_cos_sin(grid, axes, 23, CPU)
    handle = _handle()
    settings = SamplerSettings(steps=2, cfg=4.0, seed=5)
    image = WanImageEmbeds(32, 32, 9)
    with_riflex = _run(handle, settings, image=image,
                       extras=SamplingExtras(guidance=GuidanceArgs(riflex_freq_index=k)))
    assert not torch.allclose(with_riflex, _run(handle, settings, image=image), atol=1e-5)
