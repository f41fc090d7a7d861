"""Wan Fun (InP / Control) and Phantom: detection of the released layouts, the Fun Control forward
against the float64 reference, the conditioning the encode nodes build, and what the sampler feeds
the model (Phantom's subject frames, zero CLIP features for Fun without a start image)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from slipstream import NODE_CLASS_MAPPINGS as N
from slipstream.models.wan import config as wan_config
from slipstream.models.wan.config import (
    WAN21_FUN_CONTROL_1_3B,
    WAN21_FUN_CONTROL_14B,
    WAN21_FUN_INP_1_3B,
    detect_config,
    strip_dit_prefix,
)
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.pipeline import (
    SamplerSettings,
    WanImageEmbeds,
    WanModelHandle,
    WanTextEmbeds,
    sample_video,
)
from slipstream.models.wan.vae import normalize_latent

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from test_wan_dit import reference_forward  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")
TEXT_DIM, CLIP_DIM = 32, 48


def _fun_control_config(layers=2):
    return replace(wan_config.tiny("i2v", num_layers=layers, text_dim=TEXT_DIM, clip_dim=CLIP_DIM), in_dim=48,
                   name="tiny-fun-control")


def _handle(cfg) -> WanModelHandle:
    cfg = replace(cfg, text_len=16)
    dit = WanDiT(cfg).eval().requires_grad_(False)
    dit.load_state_dict(random_state_dict(cfg, seed=1))
    return WanModelHandle(dit, cfg.name, CPU)


def _text():
    g = torch.Generator().manual_seed(0)
    return WanTextEmbeds((torch.randn(5, TEXT_DIM, generator=g),), torch.randn(3, TEXT_DIM, generator=g))


def _sample(handle, image, **settings):
    return sample_video(handle, _text(), image, SamplerSettings(steps=2, cfg=settings.pop("cfg", 4.0), seed=3,
                                                                **settings), device=CPU)


@pytest.mark.parametrize("config", [WAN21_FUN_INP_1_3B, WAN21_FUN_CONTROL_1_3B, WAN21_FUN_CONTROL_14B],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_released_fun_layouts_are_detected_from_shapes(config, prefix):
    shapes = {prefix + k: v for k, v in WanDiT.expected_shapes(config).items()}
    found = detect_config(strip_dit_prefix(shapes)[0])
    assert found.name == config.name and found.cond_channels == config.in_dim - 16


def test_fun_control_with_a_reference_adapter_is_the_v1_1_model():
    shapes = dict(WanDiT.expected_shapes(WAN21_FUN_CONTROL_1_3B))
    shapes["ref_conv.weight"], shapes["ref_conv.bias"] = (1536, 16, 2, 2), (1536,)
    found = detect_config(shapes, what="Wan2.1-Fun-V1.1-1.3B-Control.safetensors")
    assert found.name == "Wan2.1-Fun-V1.1-1.3B-Control" and found.ref_in_dim == 16


def test_fun_control_forward_matches_the_float64_reference():
    cfg = replace(_fun_control_config(), text_dim=64, clip_dim=96)
    sd = random_state_dict(cfg, seed=4)
    model = WanDiT.from_state_dict(sd)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 32, 2, 4, 4, generator=g)
    t, ctx, clip = torch.tensor([700.0]), torch.randn(1, 7, 64, generator=g), torch.randn(1, 257, 96, generator=g)
    out = model(x, t, ctx, clip, y)
    ref = reference_forward(sd, cfg, x, t, ctx, clip, y)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_fun_control_encode_puts_control_then_start_image_latents(vae):
    g = torch.Generator().manual_seed(0)
    video, start = torch.rand(5, 16, 32, 3, generator=g), torch.rand(1, 16, 32, 3, generator=g)
    node = N["SlipstreamWanFunControlEncode"]()
    (embeds,) = node.encode(vae, 32, 16, 5, True, False, control_video=video, start_image=start)
    with torch.no_grad():
        control = normalize_latent(vae.vae.encode(video.permute(3, 0, 1, 2)[None] * 2 - 1))[0]
        first = normalize_latent(vae.vae.encode(start.permute(3, 0, 1, 2)[None] * 2 - 1))[0]
    assert embeds.y.shape == (32, 2, 2, 4) and embeds.clip is None
    torch.testing.assert_close(embeds.y[:16], control, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds.y[16:, :1], first, atol=1e-5, rtol=1e-5)
    assert (embeds.y[16:, 1:] == 0).all()
    with pytest.raises(ValueError, match="control_video has 5 frames but num_frames is 9"):
        node.encode(vae, 32, 16, 9, True, False, control_video=video)


def test_fun_control_samples_without_clip_and_miswired_channels_are_refused():
    handle = _handle(_fun_control_config())
    y = torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = _sample(handle, WanImageEmbeds(32, 32, 9, y=y))          # zero CLIP features, as VideoX-Fun
    assert out.shape == (1, 16, 3, 4, 4) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="20 conditioning channels but .* takes 32: use Wan Fun Control Encode"):
        _sample(handle, WanImageEmbeds(32, 32, 9, y=torch.zeros(20, 3, 4, 4)))


def test_phantom_subject_frames_follow_the_video_for_the_positive_pass_only(vae):
    images = torch.rand(2, 20, 20, 3, generator=torch.Generator().manual_seed(5))
    (embeds,) = N["SlipstreamWanPhantomSubjectEncode"]().encode(vae, images, 32, 32, 9, True)
    assert embeds.subject.shape == (16, 2, 4, 4) and embeds.latent_shape == (16, 3, 4, 4)
    handle = _handle(wan_config.tiny("t2v", num_layers=2, text_dim=TEXT_DIM))
    seen = []
    handle.dit.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    out = _sample(handle, embeds, batched_cfg="on")
    assert out.shape == (1, 16, 3, 4, 4)
    x = seen[0]
    assert x.shape == (2, 16, 5, 4, 4)                               # 3 video frames + 2 subject frames
    torch.testing.assert_close(x[0, :, 3:], embeds.subject)          # positive: the subjects
    assert (x[1, :, 3:] == 0).all()                                  # negative: empty subject frames
    torch.testing.assert_close(x[0, :, :3], x[1, :, :3])
    off = _sample(handle, embeds, batched_cfg="off")
    torch.testing.assert_close(off, out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one subject image"):
        N["SlipstreamWanPhantomSubjectEncode"]().encode(vae, torch.zeros(0, 8, 8, 3), 32, 32, 9, True)
