"""Wan VACE Encode on the tiny VAE: the 96-channel context against the official recipe computed
step by step, reference frames in front, chaining, and the errors a user sees for bad inputs."""

from __future__ import annotations

import pytest
import torch
from slipstream import NODE_CLASS_MAPPINGS as N
from slipstream.models.wan.vae import normalize_latent

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")


def encode(vae, width=32, height=16, frames=5, strength=1.0, **optional):
    node = N["SlipstreamWanVaceEncode"]()
    return node.encode(vae, width, height, frames, strength, True, False, **optional)[0]


def _video(frames=5, h=16, w=32, seed=0):
    return torch.rand(frames, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_context_follows_the_official_recipe(vae):
    video = _video(frames=7)                      # longer than num_frames: the first 5 are used
    mask = torch.zeros(7, 16, 32)
    mask[:, :, 16:] = 0.8                         # binarised at 0.5: the right half is generated
    ref = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    embeds = encode(vae, control_video=video, control_masks=mask, reference_images=ref, strength=0.6)
    (vace,) = embeds.vace
    assert vace.strength == 0.6 and vace.ref_frames == 1
    assert vace.context.shape == (96, 1 + 2, 2, 4)
    assert embeds.latent_shape == (16, 3, 2, 4)

    pixels = video[:5].permute(3, 0, 1, 2) * 2 - 1            # [3, F, H, W] in -1..1
    keep = torch.zeros(5, 16, 32)
    keep[:, :, 16:] = 1
    with torch.no_grad():
        inactive = normalize_latent(vae.vae.encode((pixels * (1 - keep))[None]))[0]
        reactive = normalize_latent(vae.vae.encode((pixels * keep)[None]))[0]
        canvas = torch.ones(3, 1, 16, 32)                      # 8x8 fitted to 16x16, centred on white
        canvas[:, 0, :, 8:24] = torch.nn.functional.interpolate(
            ref.permute(0, 3, 1, 2) * 2 - 1, size=(16, 16), mode="bilinear", align_corners=False)[0]
        ref_latent = normalize_latent(vae.vae.encode(canvas[None]))[0]
    ctx = vace.context
    torch.testing.assert_close(ctx[:16, 1:], inactive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ctx[16:32, 1:], reactive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ctx[:16, :1], ref_latent, atol=1e-5, rtol=1e-5)
    assert (ctx[16:, :1] == 0).all()
    # mask channels: 1 on the right half of every latent frame (frames 0 and 3 of 5 by nearest-exact)
    assert (ctx[32:, 1:, :, 2:] == 1).all() and (ctx[32:, 1:, :, :2] == 0).all()


def test_no_control_is_a_grey_clip_generated_everywhere(vae):
    (vace,) = encode(vae).vace
    with torch.no_grad():
        grey = normalize_latent(vae.vae.encode(torch.zeros(1, 3, 5, 16, 32)))[0]
    torch.testing.assert_close(vace.context[16:32], grey, atol=1e-5, rtol=1e-5)
    assert (vace.context[32:] == 1).all() and vace.ref_frames == 0


def test_chained_encodes_accumulate_with_their_strengths(vae):
    first = encode(vae, control_video=_video(), strength=1.0)
    both = encode(vae, control_video=_video(seed=3), strength=0.25, prev_embeds=first)
    assert [v.strength for v in both.vace] == [1.0, 0.25]
    assert torch.equal(both.vace[0].context, first.vace[0].context)
    with pytest.raises(ValueError, match="chained VACE encodes must use the same width, height and num_frames"):
        encode(vae, width=48, prev_embeds=first)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"control_video": _video(frames=3)}, r"control_video has 3 frames but num_frames is 5: set num_frames to 1"),
    ({"control_video": _video(h=32, w=32)}, r"control_video is 32x32 but the video is 32x16 \(another aspect"),
    ({"control_video": _video(), "control_masks": torch.ones(5, 8, 16)},
     r"control_masks are 16x8 but the control video is 32x16: make the masks from the same frames"),
    ({"control_video": _video(), "control_masks": torch.ones(2, 16, 32)},
     r"control_masks have 2 frames but the video has 5: give one mask per frame"),
    ({"control_masks": torch.ones(5, 16, 16)}, r"control_masks is 16x16 but the video is 32x16"),
])
def test_bad_control_inputs_name_the_fix(vae, kwargs, message):
    with pytest.raises(ValueError, match=message):
        encode(vae, **kwargs)


def test_one_mask_for_all_frames_and_a_smaller_same_shape_video_are_accepted(vae):
    mask = torch.zeros(1, 8, 16)
    mask[:, :4] = 1
    (vace,) = encode(vae, control_video=_video(h=8, w=16), control_masks=mask).vace
    assert (vace.context[32:, :, :1] == 1).all() and (vace.context[32:, :, 1:] == 0).all()
