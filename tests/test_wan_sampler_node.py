"""The Wan Sampler node: two LATENT outputs, a split across two nodes, previews through the host, the
new args nodes and the node-level bad-input errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from slipstream.models.wan.pipeline import RESUME_KEY, WanImageEmbeds
from slipstream.nodes import wan, wan_options

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from wan_sampler_fixtures import tiny_handle, tiny_text

pytestmark = pytest.mark.usefixtures("single_thread")


_handle = tiny_handle
TEXT = tiny_text()
IMAGE = WanImageEmbeds(32, 32, 5)


def _sample(handle, **kw):
    args = dict(steps=4, cfg=4.0, shift=5.0, seed=3, scheduler="unipc", denoise=1.0, force_offload=True,
                batched_cfg="auto")
    args.update(kw)
    return wan.WanSampler().sample(handle, IMAGE, TEXT, **args)


def test_two_sampler_nodes_reproduce_one():
    handle = _handle()
    (whole, denoised) = _sample(handle)
    first, _ = _sample(handle, end_step=2)
    assert RESUME_KEY in first and RESUME_KEY not in whole
    second, second_denoised = _sample(handle, samples=first, start_step=2, add_noise=False)
    assert torch.equal(second["samples"], whole["samples"])
    assert torch.equal(second_denoised["samples"], denoised["samples"])


def test_previews_go_through_the_host(monkeypatch):
    shown = []
    monkeypatch.setattr(wan, "latent_previewer", lambda kind: (lambda x0: ("JPEG", kind, tuple(x0.shape))))

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            shown.append((value, preview))

        def close(self):
            pass

    monkeypatch.setattr(wan, "ProgressBar", Bar)
    _sample(_handle(), steps=2)
    assert shown == [(1, ("JPEG", "wan21", (1, 16, 2, 4, 4))), (2, ("JPEG", "wan21", (1, 16, 2, 4, 4)))]


def test_node_level_bad_input():
    handle = _handle()
    with pytest.raises(ValueError, match="is not a LATENT"):
        _sample(handle, samples={"latent": torch.zeros(1)})
    with pytest.raises(ValueError, match="shift must be a finite number"):
        _sample(handle, shift=float("nan"))
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        _sample(handle, cfg=float("nan"))
    with pytest.raises(ValueError, match="threshold must be in"):
        wan_options.WanCacheArgs().make("teacache", 2.0, 1, -1, "main_device")
    (slg,) = wan_options.WanSkipLayerGuidance().make("5", 0.0, 1.0)
    with pytest.raises(ValueError, match="past the model"):
        _sample(handle, slg_args=slg)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="past the 2 steps the SIGMAS input holds"):
        _sample(handle, sigmas=sigmas, end_step=3)


def test_args_nodes_build_their_settings():
    (cache,) = wan_options.WanCacheArgs().make("magcache", 0.12, 2, -1, "offload_device", 3, 0.1)
    assert (cache.method, cache.magcache_k, cache.cache_device) == ("magcache", 3, "offload_device")
    for method, default in (("teacache", 0.3), ("magcache", 0.12), ("easycache", 0.2)):   # 0: the method's own
        assert wan_options.WanCacheArgs().make(method, 0.0, 1, -1, "main_device")[0].threshold == default
    (guidance,) = wan_options.WanGuidanceOptions().make(True, 1, "4,4,3,3", 6)
    assert guidance.cfg_per_step == (4.0, 4.0, 3.0, 3.0) and guidance.riflex_freq_index == 6
    latent, _ = _sample(_handle(), cache_args=cache, guidance_args=guidance)
    assert torch.isfinite(latent["samples"]).all()
