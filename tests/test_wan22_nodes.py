"""Wan 2.2 TI2V-5B and first/last-frame video through the nodes on tiny files with the real key
layouts: the clean first latent frame, the two-image CLIP context, the end-frame mask, and the
errors a mismatched VAE, model or end frame gives."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from slipstream.models.wan import demo_assets as assets
from slipstream.models.wan.latents import normalize_latent

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
import test_wan_nodes as shared  # noqa: E402

# The Wan node tests' tiny files hold the Wan 2.2 ones too: the same fixtures serve both modules.
tiny_models, wan_dirs, _node = shared.tiny_models, shared.wan_dirs, shared._node

pytestmark = pytest.mark.usefixtures("single_thread")


def _image(root, name):
    return torch.from_numpy(np.asarray(Image.open(root / "input" / name), dtype="float32") / 255)[None]


def _text_embeds():
    (encoder,) = _node("SlipstreamWanTextEncoderLoader")(assets.TEXT_ENCODER, "fp32", "offload_device")
    return _node("SlipstreamWanTextEncode")(encoder, "a paper boat drifts", "blurry", "gpu", True)[0]


def _sample(model_file, embeds, **kw):
    (model,) = _node("SlipstreamWanModelLoader")(model_file, "fp32", "disabled", "main_device")
    settings = dict(steps=2, cfg=5.0, shift=5.0, seed=1, scheduler="unipc", denoise=1.0, force_offload=True,
                    batched_cfg="auto")
    settings.update(kw)
    return _node("SlipstreamWanSampler")(model, embeds, _text_embeds(), **settings)[0]["samples"]


def test_ti2v_image_to_video_keeps_the_encoded_start_frame(wan_dirs):
    start = _image(wan_dirs, assets.START_IMAGE)
    (vae,) = _node("SlipstreamWanVAELoader")(assets.VAE22, "fp32")
    assert vae.vae.GENERATION == "2.2"
    (embeds,) = _node("SlipstreamWanImageToVideoEncode")(vae, start, 64, 32, 9, 0.0, True, False)
    assert embeds.y is None and embeds.clip is None
    assert embeds.clean_latent.shape == (48, 3, 2, 4) and embeds.denoise_mask.shape == (1, 3, 2, 4)
    assert embeds.denoise_mask[:, 0].sum() == 0 and bool((embeds.denoise_mask[:, 1:] == 1).all())
    latent = _sample(assets.DIT_TI2V, embeds)
    assert latent.shape == (1, 48, 3, 2, 4)
    # the first latent frame is exactly the (raw) encoded start image; the rest was generated
    torch.testing.assert_close(normalize_latent(latent)[0, :, 0], embeds.clean_latent[:, 0], atol=1e-5, rtol=1e-5)
    assert latent[0, :, 1:].abs().mean() > 0
    (frames,) = _node("SlipstreamWanDecode")(vae, {"samples": latent}, False, 272, 64, True)
    assert frames.shape == (9, 32, 64, 3)


def test_ti2v_text_to_video_makes_a_48_channel_16x_latent(wan_dirs):
    (empty,) = _node("SlipstreamWanEmptyEmbeds")(64, 32, 5)
    assert _sample(assets.DIT_TI2V, empty).shape == (1, 48, 2, 2, 4)
    (empty,) = _node("SlipstreamWanEmptyEmbeds")(48, 32, 5)
    with pytest.raises(ValueError, match="multiples of 32"):
        _sample(assets.DIT_TI2V, empty)


def test_first_last_frame_gives_514_clip_tokens_and_marks_both_frames(wan_dirs):
    start, end = _image(wan_dirs, assets.START_IMAGE), _image(wan_dirs, assets.END_IMAGE)
    (clip_vision,) = _node("SlipstreamWanClipVisionLoader")(assets.CLIP_VISION, "fp32", "offload_device")
    (single,) = _node("SlipstreamWanClipVisionEncode")(clip_vision, start, "disabled", 1.0, True)
    (pair,) = _node("SlipstreamWanClipVisionEncode")(clip_vision, start, "disabled", 1.0, True, end_image=end)
    assert single.shape[1] == 257 and pair.shape[1] == 514
    torch.testing.assert_close(pair[:, :257], single)
    (vae,) = _node("SlipstreamWanVAELoader")(assets.VAE, "fp32")
    (embeds,) = _node("SlipstreamWanImageToVideoEncode")(vae, start, 64, 48, 9, 0.0, True, False, clip_embeds=pair,
                                                         end_image=end)
    mask = embeds.y[:4]
    assert bool((mask[:, 0] == 1).all()) and bool((mask[3, -1] == 1).all()) and mask[:, 1].sum() == 0
    assert mask[:3, -1].sum() == 0          # the last latent frame holds 4 pixel frames; only the last is given
    flf = _sample(assets.DIT_FLF2V, embeds)
    plain = _sample(assets.DIT_I2V, embeds)          # a plain I2V model takes the two-image context too
    assert flf.shape == plain.shape == (1, 16, 3, 6, 8) and not torch.allclose(flf, plain)


def test_mismatched_vae_end_frame_and_model_are_explained(wan_dirs):
    start = _image(wan_dirs, assets.START_IMAGE)
    (vae21,) = _node("SlipstreamWanVAELoader")(assets.VAE, "fp32")
    (vae22,) = _node("SlipstreamWanVAELoader")(assets.VAE22, "fp32")
    small_end = start[:, :40, :60]
    with pytest.raises(ValueError, match="same size"):
        _node("SlipstreamWanImageToVideoEncode")(vae21, start, 64, 48, 9, 0.0, True, False, end_image=small_end)
    with pytest.raises(ValueError, match="start frame only"):
        _node("SlipstreamWanImageToVideoEncode")(vae22, start, 64, 32, 9, 0.0, True, False, end_image=start)
    (i2v_embeds,) = _node("SlipstreamWanImageToVideoEncode")(vae21, start, 64, 32, 9, 0.0, True, False)
    with pytest.raises(ValueError, match="wan2.2_vae"):                  # Wan 2.1 VAE embeds, TI2V-5B model
        _sample(assets.DIT_TI2V, i2v_embeds)
    (ti2v_embeds,) = _node("SlipstreamWanImageToVideoEncode")(vae22, start, 64, 32, 9, 0.0, True, False)
    with pytest.raises(ValueError, match="wan_2.1_vae"):                 # Wan 2.2 VAE embeds, Wan 2.1 I2V model
        _sample(assets.DIT_I2V, ti2v_embeds)
    with pytest.raises(ValueError, match="wan2.2_vae"):                  # a TI2V latent into the Wan 2.1 VAE
        _node("SlipstreamWanDecode")(vae21, {"samples": torch.zeros(1, 48, 2, 2, 4)}, False, 272, 64, True)
    with pytest.raises(ValueError, match="wan_2.1_vae"):
        _node("SlipstreamWanDecode")(vae22, {"samples": torch.zeros(1, 16, 2, 4, 8)}, False, 272, 64, True)


def test_the_sampler_hands_the_ti2v_mask_to_the_dit_every_step(wan_dirs, monkeypatch):
    from slipstream.models.wan.dit import WanDiT

    seen = []
    original = WanDiT.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("denoise_mask"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WanDiT, "forward", spy)
    (vae,) = _node("SlipstreamWanVAELoader")(assets.VAE22, "fp32")
    (embeds,) = _node("SlipstreamWanImageToVideoEncode")(vae, _image(wan_dirs, assets.START_IMAGE), 64, 32, 9, 0.0,
                                                         True, False)
    _sample(assets.DIT_TI2V, embeds, steps=3, cfg=1.0)
    assert len(seen) == 3 and all(m is not None and m.shape == (1, 1, 3, 2, 4) for m in seen)
    assert all(torch.equal(m[0], embeds.denoise_mask) for m in seen)
