"""EasyCache as ComfyUI core runs it: the predicted output change accumulates k times the input's change
since the last computed step (checked against hand arithmetic), and the CFG branches of a step share
one decision (unit level and in a sampling run with the branches as separate passes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from slipstream.models.wan.pipeline import (
    RunStats,
    SamplerSettings,
    SamplingExtras,
    WanImageEmbeds,
    sample_video,
)
from slipstream.models.wan.step_cache import CacheArgs, StepCache

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from wan_sampler_fixtures import CPU, tiny_handle, tiny_text

pytestmark = pytest.mark.usefixtures("single_thread")


def _t(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def test_easycache_accumulates_the_change_since_the_last_computed_step():
    """Threshold 0.2, one element, so every mean |.| is the value itself.

    step 0: x = 1.00, computed, v = 0.80 (no rate yet)
    step 1: x = 1.10, computed, v = 1.00: k = |1.00 - 0.80| / |1.10 - 1.00| = 0.2 / 0.1 = 2;
            x_c = 1.10, v_c = 1.00, mean |v_c| = 1
    step 2: x = 1.12: + k·|1.12 - 1.10| / 1 = 2·0.02 = 0.04 -> sum 0.04 < 0.2: skipped,
            output x + (v_c - x_c) = 1.12 - 0.10 = 1.02
    step 3: x = 1.15: + 2·|1.15 - 1.10| = 0.10 -> sum 0.14 < 0.2: skipped
    step 4: x = 1.17: + 2·|1.17 - 1.10| = 0.14 -> sum 0.28 >= 0.2: computed, the sum starts again at 0.
            (Adding only the last step's change, 2·0.02 = 0.04, would give 0.18 and skip it.)
            v = 1.14: k = |1.14 - 1.00| / |1.17 - 1.10| = 0.14 / 0.07 = 2; mean |v_c| = 1.14
    step 5: x = 1.20: + 2·|1.20 - 1.17| / 1.14 = 0.06 / 1.14 = 0.0526 -> skipped
    """
    cache = StepCache(CacheArgs("easycache", 0.2, start_step=1), dim=1536, model_type="t2v", pixels=0, steps=10)
    assert cache.skip_forward("k", 0, 0, _t(1.0)) is None
    cache.remember_output("k", _t(1.0), _t(0.8))
    assert cache.skip_forward("k", 0, 1, _t(1.1)) is None, "no rate k measured yet"
    cache.remember_output("k", _t(1.1), _t(1.0))
    assert cache.groups["k"].k == pytest.approx(2.0)
    reused = cache.skip_forward("k", 0, 2, _t(1.12))
    assert reused is not None and reused.item() == pytest.approx(1.02)
    assert cache.groups["k"].accumulated == pytest.approx(0.04)
    assert cache.skip_forward("k", 0, 3, _t(1.15)) is not None
    assert cache.groups["k"].accumulated == pytest.approx(0.14)
    assert cache.skip_forward("k", 0, 4, _t(1.17)) is None, "0.28 crossed the threshold"
    assert cache.groups["k"].accumulated == 0.0
    cache.remember_output("k", _t(1.17), _t(1.14))
    assert cache.groups["k"].k == pytest.approx(2.0) and cache.groups["k"].last_norm == pytest.approx(1.14)
    assert cache.skip_forward("k", 0, 5, _t(1.2)) is not None
    assert cache.groups["k"].accumulated == pytest.approx(0.06 / 1.14)
    assert [cache.step_decisions[("k", s)] for s in range(6)] == [False, False, True, True, False, True]
    assert cache.report.skipped == {"cond": 3} and cache.report.computed == {"cond": 3}
    assert cache.skip_forward("k", 0, 9, _t(1.2)) is None, "the last step always runs"


def test_cond_and_uncond_follow_one_decision_per_step():
    """The uncond branch's own numbers would compute at step 2 (its output moves far more); it follows
    the cond branch, which asks first, and reuses its own transformation; at step 3 cond computes and
    uncond, asking second, computes with it."""
    cache = StepCache(CacheArgs("easycache", 0.2, start_step=1), dim=1536, model_type="t2v", pixels=0, steps=10)
    cond, uncond = (0, "w"), (1, "w")
    inputs = [1.0, 1.1, 1.12, 1.3]
    for step, (x, v_cond, v_uncond) in enumerate(zip(inputs[:2], (0.8, 1.0), (-2.0, 2.0), strict=True)):
        for row, v in ((cond, v_cond), (uncond, v_uncond)):
            assert cache.skip_forward(row, row[0], step, _t(x), group="w") is None
            cache.remember_output(row, _t(x), _t(v), group="w")
    # cond: k = 2, sum 2·0.02 = 0.04: skip. uncond alone: k = 4 / 0.1 = 40, 40·0.02 / 2 = 0.4: compute.
    got_cond = cache.skip_forward(cond, 0, 2, _t(1.12), group="w")
    got_uncond = cache.skip_forward(uncond, 1, 2, _t(1.12), group="w")
    assert got_cond.item() == pytest.approx(1.12 - 0.1) and got_uncond.item() == pytest.approx(1.12 + 0.9)
    # cond: + 2·0.2 = 0.4 -> 0.44: compute; uncond follows although it asks second.
    assert cache.skip_forward(cond, 0, 3, _t(1.3), group="w") is None
    assert cache.skip_forward(uncond, 1, 3, _t(1.3), group="w") is None
    assert cache.step_decisions[("w", 2)] is True and cache.step_decisions[("w", 3)] is False
    assert cache.report.skipped == {"cond": 1, "uncond": 1}
    assert cache.report.computed == {"cond": 3, "uncond": 3}


def test_a_revoked_leader_skip_marks_the_step_computed():
    """Batched CFG: the leader may skip but its partner has nothing cached, so both run; the step counts
    as computed and the prediction starts again from zero."""
    cache = StepCache(CacheArgs("easycache", 0.2, start_step=1), dim=1536, model_type="t2v", pixels=0, steps=10)
    cond, uncond = (0, "w"), (1, "w")
    for step, (x, v) in enumerate(((1.0, 0.8), (1.1, 1.0))):
        cache.skip_forward(cond, 0, step, _t(x), group="w")
        cache.remember_output(cond, _t(x), _t(v), group="w")
    assert cache.skip_forward(cond, 0, 2, _t(1.12), group="w") is not None
    assert cache.skip_forward(uncond, 1, 2, _t(1.12), group="w") is None, "nothing cached for uncond yet"
    cache.revoke_skip(cond, 0)
    assert cache.step_decisions[("w", 2)] is False and cache.groups["w"].accumulated == 0.0
    assert cache.report.skipped == {"cond": 0} and cache.report.computed == {"cond": 3, "uncond": 1}


def test_a_two_pass_cfg_run_skips_the_same_steps_in_both_branches(built_step_caches):
    """With the branches as two forwards (batched CFG off), every skipped step skips both, and the
    skips are the steps the cache recorded as reused."""

    settings = SamplerSettings(steps=10, cfg=4.0, seed=3, batched_cfg="off")
    stats = RunStats()
    out = sample_video(tiny_handle(3), tiny_text(), WanImageEmbeds(32, 32, 5), settings, device=CPU,
                       force_offload=False, stats=stats,
                       extras=SamplingExtras(CacheArgs("easycache", 1.0, start_step=1)))
    assert torch.isfinite(out).all() and stats.cache_skipped > 0
    assert stats.cache_by_branch["cond"] == stats.cache_by_branch["uncond"] == stats.cache_skipped // 2
    (cache,) = built_step_caches
    assert len(cache.step_decisions) == 10, "one decision per step (one latent, no windows)"
    assert sum(cache.step_decisions.values()) == stats.cache_by_branch["cond"]
