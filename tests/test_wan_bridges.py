"""Core CONDITIONING and CLIP_VISION_OUTPUT bridged into Wan embeds give what our own encoders give."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from slipstream import NODE_CLASS_MAPPINGS
from slipstream.models.wan import clip_vision as C
from slipstream.models.wan.bridges import (
    BridgeInputError,
    clip_embeds_from_vision_output,
    real_tokens,
)
from slipstream.models.wan.demo_assets import seeded_state_dict
from slipstream.models.wan.encoders import WanClipVisionHandle, encode_clip

TEXT = NODE_CLASS_MAPPINGS["SlipstreamWanTextEmbedsFromConditioning"]()
CLIP = NODE_CLASS_MAPPINGS["SlipstreamWanClipEmbedsFromVisionOutput"]()


def _core_conditioning(*prompts: torch.Tensor, length: int = 512) -> list:
    """What core's umT5 CLIPTextEncode hands over: [1, 512, 4096] per prompt, padded rows zeroed."""
    out = []
    for p in prompts:
        padded = torch.zeros(1, max(length, p.shape[0]), p.shape[1])
        padded[0, : p.shape[0]] = p
        out.append([padded, {"pooled_output": None}])
    return out


def test_trimmed_tokens_are_exactly_the_unpadded_prompt():
    g = torch.Generator().manual_seed(0)
    a, b, neg = (torch.randn(n, 4096, generator=g) for n in (7, 12, 3))
    (embeds,) = TEXT.convert(_core_conditioning(a, b), _core_conditioning(neg))
    assert len(embeds.positive) == 2
    assert torch.equal(embeds.positive[0], a) and torch.equal(embeds.positive[1], b)
    assert torch.equal(embeds.negative, neg)
    (no_negative,) = TEXT.convert(_core_conditioning(a))
    assert no_negative.negative is None


def test_an_interior_zero_row_is_kept_and_an_empty_prompt_keeps_one_row():
    hidden = torch.ones(6, 4)
    hidden[2] = 0            # a real token that happens to be zero stays: only trailing rows are padding
    hidden[4:] = 0
    assert real_tokens(hidden).shape[0] == 4
    assert real_tokens(torch.zeros(5, 4)).shape[0] == 1


def test_batched_rows_become_sections_in_order():
    rows = torch.zeros(2, 512, 4096)
    rows[0, :3] = 1.0
    rows[1, :5] = 2.0
    (embeds,) = TEXT.convert([[rows, {}]])
    assert [p.shape[0] for p in embeds.positive] == [3, 5]
    assert float(embeds.positive[1][0, 0]) == 2.0


@pytest.mark.parametrize("conditioning, message", [
    ("a prompt", "expected a CONDITIONING"),
    ([], "expected a CONDITIONING"),
    ([[torch.zeros(1, 77, 768), {}]], "768 wide"),
    ([[torch.zeros(77, 4096), {}]], "entry 0 is not a [batch, tokens, width] tensor"),
    ([[torch.full((1, 4, 4096), float("nan")), {}]], "NaN"),
])
def test_bad_conditioning_is_named(conditioning, message):
    with pytest.raises(BridgeInputError) as err:
        TEXT.convert(conditioning)
    assert message in str(err.value) and "positive" in str(err.value)


def test_two_negative_prompts_are_refused():
    neg = _core_conditioning(torch.ones(2, 4096), torch.ones(3, 4096))
    with pytest.raises(BridgeInputError, match="negative: holds 2 prompts"):
        TEXT.convert(_core_conditioning(torch.ones(2, 4096)), neg)


@pytest.fixture(scope="module")
def tower():
    sd = seeded_state_dict(lambda: C.WanClipVision(C.TINY_VIT), 0, lambda name, shape, noise: (
        1.0 + 0.1 * noise if ("norm" in name and name.endswith("weight")) else 0.2 * noise))
    return C.WanClipVision.from_state_dict(sd)


def test_penultimate_states_equal_wan_clip_vision_encode(tower):
    images = torch.rand(2, 40, 70, 3, generator=torch.Generator().manual_seed(3))
    ours = encode_clip(WanClipVisionHandle(tower, "tiny", torch.device("cpu")), images, torch.device("cpu"),
                       crop=False, strength=0.7, offload=False)
    with torch.no_grad():
        states = tower.encode_image(images.permute(0, 3, 1, 2))   # what core's Output carries
    (bridged,) = CLIP.convert(SimpleNamespace(penultimate_hidden_states=states), 0.7)
    torch.testing.assert_close(bridged, ours, rtol=0, atol=0)


def test_an_end_image_doubles_the_tokens_start_first():
    start = torch.randn(1, 257, 1280)
    end = torch.randn(1, 257, 1280)
    (both,) = CLIP.convert({"penultimate_hidden_states": start}, 1.0, {"penultimate_hidden_states": end})
    assert both.shape == (1, 514, 1280)
    assert torch.equal(both[:, :257], start) and torch.equal(both[:, 257:], end)


@pytest.mark.parametrize("start, end, strength, message", [
    (object(), None, 1.0, "expected a CLIP_VISION_OUTPUT"),
    (SimpleNamespace(penultimate_hidden_states=torch.zeros(257, 1280)), None, 1.0, "shape (257, 1280)"),
    (SimpleNamespace(penultimate_hidden_states=torch.zeros(1, 257, 1280)),
     SimpleNamespace(penultimate_hidden_states=torch.zeros(1, 257, 1024)), 1.0, "another CLIP vision model"),
    (SimpleNamespace(penultimate_hidden_states=torch.zeros(1, 257, 1280)), None, float("nan"), "finite"),
])
def test_bad_vision_output_is_named(start, end, strength, message):
    with pytest.raises(BridgeInputError) as err:
        clip_embeds_from_vision_output(start, end, strength)
    assert message in str(err.value)
