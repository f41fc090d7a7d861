"""VACE through the nodes on the tiny files: loader (with block swap over the VACE blocks), Wan VACE
Encode with a control video and a reference image, the sampler, and the trimmed latent."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from slipstream.models.wan import demo_assets as assets

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from test_wan_nodes import _node, _text_embeds, tiny_models, wan_dirs  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")


def _sample(model, embeds):
    (latent,) = _node("SlipstreamWanSampler")(model, embeds, _text_embeds(), steps=2, cfg=5.0, shift=16.0, seed=1,
                                              scheduler="unipc", denoise=1.0, force_offload=True, batched_cfg="auto")
    return latent["samples"]


@pytest.mark.usefixtures("wan_dirs")
def test_vace_runs_through_the_nodes_and_block_swap_changes_nothing(caplog):
    (vae,) = _node("SlipstreamWanVAELoader")(assets.VAE, "fp32")
    g = torch.Generator().manual_seed(0)
    video, ref = torch.rand(9, 48, 64, 3, generator=g), torch.rand(1, 30, 40, 3, generator=g)
    (embeds,) = _node("SlipstreamWanVaceEncode")(vae, 64, 48, 9, 1.0, True, False, control_video=video,
                                                 reference_images=ref)
    (plain,) = _node("SlipstreamWanModelLoader")(assets.DIT_VACE, "fp32", "disabled", "main_device")
    assert plain.config.is_vace
    expected = _sample(plain, embeds)
    assert expected.shape == (1, 16, 3, 6, 8)                  # the reference frame is cut off
    (swap,) = _node("SlipstreamWanBlockSwap")(2, False, False, False, 1)
    with caplog.at_level(logging.INFO, logger="slipstream.wan"):
        (swapped,) = _node("SlipstreamWanModelLoader")(assets.DIT_VACE, "fp32", "disabled", "main_device",
                                                       block_swap_args=swap)
    assert "1 of 2 VACE blocks swapped too" in caplog.text
    assert torch.equal(_sample(swapped, embeds), expected)
