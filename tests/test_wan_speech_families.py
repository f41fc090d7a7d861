"""The speech model loader with the real MultiTalk and FantasyTalking families: detection from their files,
the Wan loader path storing their block weights as int8 / fp8 with the base model's, their own errors
for a model they cannot drive, and a guided sampler step on their conditionings."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from slipstream.models.wan import config as wan_config
from slipstream.models.wan.demo_speech_assets import (
    tiny_fantasytalking_state_dict,
    tiny_i2v_config,
    tiny_multitalk_state_dict,
)
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.speech_models import attach_speech_model, describe_speech_model
from slipstream.models.wan.t5 import TINY_UMT5

pytestmark = pytest.mark.usefixtures("single_thread")
WRITERS = {"multitalk": tiny_multitalk_state_dict, "fantasytalking": tiny_fantasytalking_state_dict}


def _dit(config, weight_dtype=None):
    sd = random_state_dict(config, seed=3)
    return WanDiT.from_state_dict(sd, dtype=torch.float32, weight_dtype=weight_dtype)


@pytest.mark.parametrize("family", sorted(WRITERS))
def test_real_files_are_recognised_and_stored_like_the_blocks(tmp_path, family):
    path = tmp_path / f"{family}.safetensors"
    save_file(WRITERS[family](tiny_i2v_config()), str(path))
    assert describe_speech_model(str(path)).family == family
    dit = _dit(tiny_i2v_config(), weight_dtype=torch.float8_e4m3fn)
    before = set(dit.quantizable_keys())
    attach_speech_model(dit, str(path))
    added = [k for k in dit.quantizable_keys() if k not in before]
    assert added, "the speech model adds block Linears"
    params = dict(dit.named_parameters())
    assert all(params[k].dtype == torch.float8_e4m3fn for k in added)


@pytest.mark.parametrize("family", sorted(WRITERS))
def test_a_text_to_video_model_gets_the_familys_error(tmp_path, family):
    path = tmp_path / f"{family}.safetensors"
    save_file(WRITERS[family](tiny_i2v_config()), str(path))
    t2v = wan_config.tiny("t2v", text_dim=TINY_UMT5.dim)
    with pytest.raises(ValueError, match="(?i)text-to-video|i2v|image-to-video"):
        attach_speech_model(_dit(t2v), str(path))
