"""The Wan Cache Calibrate node on a tiny random-weight Wan DiT: one uncached run through the Wan Sampler's
own path, calibrated tables that differ from the published ones, a sampler run driven by them, and hooks
that come off even when the run is cancelled."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from slipstream.models.wan.pipeline import WanImageEmbeds
from slipstream.models.wan.step_cache import CacheArgs, mag_ratios, teacache_coefficients
from slipstream.nodes import wan, wan_cache_calibration, wan_options

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from wan_sampler_fixtures import tiny_handle, tiny_text

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT = tiny_text()
IMAGE = WanImageEmbeds(32, 32, 5)
RUN = dict(cfg=4.0, shift=5.0, seed=2, scheduler="unipc")


def _calibrate(handle, cache_args, steps=8):
    return wan_cache_calibration.WanCacheCalibrate().calibrate(handle, IMAGE, TEXT, cache_args, steps, **RUN)


def _sample(handle, cache_args, steps=6):
    (latent, _) = wan.WanSampler().sample(handle, IMAGE, TEXT, steps, force_offload=True, denoise=1.0,
                                          batched_cfg="auto", cache_args=cache_args, **RUN)
    return latent["samples"]


def test_calibrated_cache_args_differ_from_the_published_tables_and_drive_the_sampler():
    handle = tiny_handle(3)
    (teacache,) = wan_options.WanCacheArgs().make("teacache", 0.3, 1, -1, "main_device")
    (calibrated,) = _calibrate(handle, teacache)
    assert isinstance(calibrated, CacheArgs)
    assert (calibrated.method, calibrated.threshold, calibrated.start_step) == ("teacache", 0.3, 1)
    assert not handle.dit.blocks[0]._forward_pre_hooks and not handle.dit._forward_hooks
    dim = handle.config.dim
    assert len(calibrated.coefficients) == 5
    assert calibrated.coefficients != teacache_coefficients(dim, "t2v", 32 * 32)
    assert len(calibrated.mag_ratios) == 16 and calibrated.mag_ratios[:2] == (1.0, 1.0)
    published = [mag_ratios(dim, "t2v", 8, b) for b in (0, 1)]
    assert [list(calibrated.mag_ratios[b::2]) for b in (0, 1)] != published
    # Same seed and settings: the same calibration (the least-squares fit up to LAPACK rounding).
    (again,) = _calibrate(handle, teacache)
    assert again.mag_ratios == calibrated.mag_ratios
    assert again.coefficients == pytest.approx(calibrated.coefficients, rel=1e-6)

    plain = _sample(handle, None)
    with_published = _sample(handle, teacache)
    with_calibrated = _sample(handle, calibrated)
    assert with_calibrated.shape == plain.shape and torch.isfinite(with_calibrated).all()
    assert not torch.equal(with_calibrated, with_published), "the sampler ignored the calibrated polynomial"

    (magcache,) = wan_options.WanCacheArgs().make("magcache", 0.12, 1, -1, "main_device")
    (mag_calibrated,) = _calibrate(handle, magcache)
    assert mag_calibrated.mag_ratios == calibrated.mag_ratios and mag_calibrated.method == "magcache"
    assert torch.isfinite(_sample(handle, mag_calibrated)).all()


def test_too_few_steps_and_a_cancelled_run_leave_no_hooks(monkeypatch):
    handle = tiny_handle(2)
    (cache,) = wan_options.WanCacheArgs().make("teacache", 0.3, 1, -1, "main_device")
    with pytest.raises(ValueError, match="Wan Cache Calibrate: .*more steps"):
        wan_cache_calibration.WanCacheCalibrate().calibrate(handle, IMAGE, TEXT, cache, 4, **{**RUN, "cfg": 1.0})
    with pytest.raises(ValueError, match="not a Wan Cache Args"):
        _calibrate(handle, None)

    class Cancelled(Exception):
        pass

    def cancel():
        raise Cancelled

    monkeypatch.setattr(wan, "check_interrupt", cancel)
    with pytest.raises(Cancelled):
        _calibrate(handle, cache)
    assert not handle.dit.blocks[0]._forward_pre_hooks and not handle.dit.blocks[-1]._forward_hooks
    assert not handle.dit._forward_hooks
