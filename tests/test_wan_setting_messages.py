"""Bad sampler and tiling settings are refused with a message that names the fix, not only the fault."""

from __future__ import annotations

import math

import pytest
from slipstream.models.wan.pipeline import SamplerSettings
from slipstream.models.wan.tiling import Tiling


@pytest.mark.parametrize(("kwargs", "fault", "fix"), [
    (dict(batched_cfg="maybe"), "batched_cfg must be auto, on or off", "pick one of those"),
    (dict(shift=math.inf), "shift must be a finite number", "set the sampler's 'shift'"),
    (dict(cfg=-1.0), "cfg must be >= 0", "use 1 to skip the negative prompt"),
    (dict(seed=-3), "seed must be in", "pick a seed between 0 and"),
    (dict(cfg_per_step=(5.0, math.nan)), "per-step cfg must be a finite", "fix Wan Guidance Options"),
    (dict(scheduler="ddim"), "Unknown scheduler 'ddim'", "Valid choices: unipc"),
])
def test_sampler_settings_say_what_to_change(kwargs, fault, fix):
    with pytest.raises(ValueError) as info:
        SamplerSettings(**kwargs)
    assert fault in str(info.value) and fix in str(info.value)


def test_tiling_says_what_to_change():
    with pytest.raises(ValueError, match="raise tile_size to 16 px or more"):
        Tiling(tile=1, overlap=0)
    with pytest.raises(ValueError, match="lower tile_overlap below tile_size"):
        Tiling(tile=4, overlap=4)
