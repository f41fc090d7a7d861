"""Wan Fun with the reference adapter (Fun V1.1 Control, Wan 2.2 Fun A14B Control) and Fun InP, and
Phantom's separate subject guidance: detection of the full-size layouts, the forward with a
reference frame against the float64 reference, what the encode nodes build and the sampler feeds
the model, the three-branch Phantom formula against a hand computation, and the errors bad wiring
gets."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from slipstream import NODE_CLASS_MAPPINGS as N
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan import config as wan_config
from slipstream.models.wan.config import (
    WAN21_FUN_V11_CONTROL_1_3B,
    WAN21_FUN_V11_CONTROL_14B,
    WAN22_FUN_CONTROL_A14B,
    WAN22_I2V_A14B,
    detect_config,
    file_hint,
    strip_dit_prefix,
)
from slipstream.models.wan.denoiser import SamplingExtras, WanDenoiser
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.encoders import WanVAEHandle
from slipstream.models.wan.guidance import GuidanceArgs, combine, phantom_combine
from slipstream.models.wan.pipeline import (
    RunStats,
    SamplerSettings,
    WanImageEmbeds,
    WanModelHandle,
    WanTextEmbeds,
    sample_video,
)
from slipstream.models.wan.vae import normalize_latent
from slipstream.models.wan.vae22 import TINY_VAE22, Wan22VAE

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from test_wan_dit import reference_forward  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")
TEXT_DIM, CLIP_DIM = 32, 48


def _fun22_control(layers=2, text_dim=TEXT_DIM):
    """The Wan 2.2 Fun A14B Control layout, tiny: no CLIP, 16 + 36 input channels, a 16-channel ref_conv."""
    return replace(wan_config.tiny("i2v", num_layers=layers, text_dim=text_dim, image_context=False), in_dim=52,
                   ref_in_dim=16, name="tiny-fun22-control")


def _fun21_v11_control(layers=2, text_dim=TEXT_DIM, clip_dim=CLIP_DIM):
    return replace(wan_config.tiny("i2v", num_layers=layers, text_dim=text_dim, clip_dim=clip_dim), in_dim=48,
                   ref_in_dim=16, name="tiny-fun-v1.1-control")


def _handle(cfg, seed=1) -> WanModelHandle:
    cfg = replace(cfg, text_len=16)
    dit = WanDiT(cfg).eval().requires_grad_(False)
    dit.load_state_dict(random_state_dict(cfg, seed=seed))
    return WanModelHandle(dit, cfg.name, CPU)


def _text():
    g = torch.Generator().manual_seed(0)
    return WanTextEmbeds((torch.randn(5, TEXT_DIM, generator=g),), torch.randn(3, TEXT_DIM, generator=g))


def _sample(handle, image, **settings):
    return sample_video(handle, _text(), image, SamplerSettings(steps=2, cfg=settings.pop("cfg", 4.0), seed=3,
                                                                **settings), device=CPU)


# ------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("config, hint", [(WAN21_FUN_V11_CONTROL_1_3B, "Wan2.1-Fun-V1.1-1.3B-Control"),
                                          (WAN21_FUN_V11_CONTROL_14B, "Wan2.1-Fun-V1.1-14B-Control"),
                                          (WAN22_FUN_CONTROL_A14B, "wan2.2_fun_control_high_noise_14B_fp16")],
                         ids=lambda v: getattr(v, "name", v))
def test_full_size_fun_reference_layouts_are_detected_from_their_shapes(config, hint):
    shapes = {"model.diffusion_model." + k: v for k, v in WanDiT.expected_shapes(config).items()}
    # the real tensors: ref_conv is a 2x2-stride Conv2d of the 16-channel latent to the model width
    assert shapes["model.diffusion_model.ref_conv.weight"] == (config.dim, 16, 2, 2)
    assert shapes["model.diffusion_model.ref_conv.bias"] == (config.dim,)
    found = detect_config(strip_dit_prefix(shapes)[0], hint=file_hint(shapes, None, hint))
    assert found.name == config.name and found.ref_in_dim == 16
    if config is WAN22_FUN_CONTROL_A14B:
        assert shapes["model.diffusion_model.patch_embedding.weight"] == (5120, 52, 1, 2, 2)
        assert "model.diffusion_model.img_emb.proj.0.weight" not in shapes
        assert found.generation == "2.2" and found.boundary == 0.9 and found.expert == "high_noise"
        assert found.cond_channels == 36
    else:
        assert found.cond_channels == 32 and found.has_clip


def test_wan22_fun_inp_a14b_file_loads_as_the_i2v_a14b_layout_and_samples_end_to_end(tmp_path, vae):
    """The Fun InP A14B experts have the Wan 2.2 I2V-A14B tree exactly: a file named as released loads
    as that row with its expert, and Wan Fun InP Encode drives it from start and end image."""
    shapes = WanDiT.expected_shapes(WAN22_I2V_A14B)
    assert shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2) and "ref_conv.weight" not in shapes
    name = "wan2.2_fun_inpaint_low_noise_14B_fp16.safetensors"
    found = detect_config(shapes, hint=file_hint(shapes, None, name))
    assert found.name == "Wan2.2-I2V-A14B" and found.expert == "low_noise" and found.boundary == 0.9
    cfg = wan_config.tiny("i2v", num_layers=2, text_dim=TEXT_DIM, image_context=False)
    path = tmp_path / name
    save_file({"model.diffusion_model." + k: v for k, v in random_state_dict(cfg, seed=2).items()}, str(path))
    dit = WanDiT.from_file(str(path))
    assert dit.config.generation == "2.2" and not dit.config.has_clip
    g = torch.Generator().manual_seed(3)
    start, end = torch.rand(1, 32, 32, 3, generator=g), torch.rand(1, 32, 32, 3, generator=g)
    (embeds,) = N["SlipstreamWanFunInpaintEncode"]().encode(vae, 32, 32, 9, True, False, start_image=start,
                                                              end_image=end)
    assert embeds.y.shape == (20, 3, 4, 4)
    assert (embeds.y[:4, 0] == 1).all() and (embeds.y[:4, 1] == 0).all() and (embeds.y[3, 2] == 1).all()
    handle = WanModelHandle(dit.requires_grad_(False), "fun-inp", CPU)
    out = _sample(handle, replace(embeds))
    assert out.shape == (1, 16, 3, 4, 4) and torch.isfinite(out).all()
    (end_only,) = N["SlipstreamWanFunInpaintEncode"]().encode(vae, 32, 32, 9, True, False, end_image=end)
    assert (end_only.y[:4, :2] == 0).all() and (end_only.y[:3, 2] == 0).all() and (end_only.y[3, 2] == 1).all()
    (neither,) = N["SlipstreamWanFunInpaintEncode"]().encode(vae, 32, 32, 9, True, False)
    assert (neither.y[:4] == 0).all()


def test_bad_reference_adapters_and_camera_models_are_refused_with_what_they_are():
    shapes = dict(WanDiT.expected_shapes(WAN21_FUN_V11_CONTROL_1_3B))
    shapes["ref_conv.weight"] = (1536, 16, 3, 3)
    with pytest.raises(CheckpointError, match=r"ref_conv.weight' has shape \(1536, 16, 3, 3\).*Conv2d"):
        detect_config(shapes, what="broken.safetensors")
    t2v = dict(WanDiT.expected_shapes(wan_config.WAN21_T2V_1_3B), **{"ref_conv.weight": (1536, 16, 2, 2)})
    with pytest.raises(CheckpointError, match="image-conditioned model"):
        detect_config(t2v)
    camera = dict(WanDiT.expected_shapes(WAN21_FUN_V11_CONTROL_1_3B), **{"control_adapter.conv.weight": (1536, 96, 2, 2)})
    with pytest.raises(CheckpointError, match="Control-Camera.*control_adapter.*WanCameraImageToVideo"):
        detect_config(camera, what="Wan2.1-Fun-V1.1-1.3B-Control-Camera.safetensors")


# ------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("make", [_fun21_v11_control, _fun22_control], ids=["wan21-v1.1", "wan22-a14b"])
def test_forward_with_a_reference_frame_matches_the_float64_reference(make):
    cfg = make(text_dim=64) if make is _fun22_control else make(text_dim=64, clip_dim=96)
    sd = random_state_dict(cfg, seed=4)
    model = WanDiT.from_state_dict(sd)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1, 16, 2, 4, 6, generator=g), torch.randn(1, cfg.cond_channels, 2, 4, 6, generator=g)
    ref = torch.randn(1, 16, 4, 6, generator=g)
    t, ctx = torch.tensor([700.0]), torch.randn(1, 7, 64, generator=g)
    clip = torch.randn(1, 257, 96, generator=g) if cfg.has_clip else None
    out = model(x, t, ctx, clip, y, reference=ref)
    expected = reference_forward(sd, cfg, x, t, ctx, clip, y, reference=ref)
    assert out.shape == x.shape
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    without = model(x, t, ctx, clip, y)            # core's choice without a reference: no extra tokens
    expected_without = reference_forward(sd, cfg, x, t, ctx, clip, y)
    assert ((without.double() - expected_without).abs().max() / expected_without.abs().max()).item() <= 1e-4
    assert (without - out).abs().max() > 1e-3      # the reference frame really steers the prediction
    with pytest.raises(ValueError, match=r"reference must be one latent frame \[B, 16, H, W\]"):
        model(x, t, ctx, clip, y, reference=ref[:, :, :2])


# ------------------------------------------------------------------------------------------ nodes → sampler


def _capture(handle):
    seen = []
    handle.dit.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    return seen


def test_fun_control_encode_with_ref_image_feeds_wan22_mask_and_reference(vae):
    g = torch.Generator().manual_seed(0)
    video, start = torch.rand(9, 32, 32, 3, generator=g), torch.rand(1, 32, 32, 3, generator=g)
    ref_image = torch.rand(1, 32, 64, 3, generator=g)               # wider: centre-cropped, not stretched
    node = N["SlipstreamWanFunControlEncode"]()
    (embeds,) = node.encode(vae, 32, 32, 9, True, False, control_video=video, start_image=start, ref_image=ref_image)
    with torch.no_grad():
        crop = ref_image[:, :, 16:48].permute(3, 0, 1, 2)[None] * 2 - 1
        expected_ref = normalize_latent(vae.vae.encode(crop))[0, :, 0]
    assert embeds.y.shape == (32, 3, 4, 4) and embeds.fun_mask.shape == (4, 3, 4, 4)
    torch.testing.assert_close(embeds.reference, expected_ref, atol=1e-5, rtol=1e-5)
    assert (embeds.fun_mask[:, 0] == 1).all() and (embeds.fun_mask[:, 1:] == 0).all()

    handle = _handle(_fun22_control())
    seen = _capture(handle)
    out = _sample(handle, embeds, batched_cfg="on")
    assert out.shape == (1, 16, 3, 4, 4) and torch.isfinite(out).all()
    y, kwargs = seen[0][0][4], seen[0][1]
    assert y.shape == (2, 36, 3, 4, 4)                              # [control, mask, start image] for both rows
    torch.testing.assert_close(y[0, :16], embeds.y[:16])
    torch.testing.assert_close(y[0, 16:20], embeds.fun_mask)
    torch.testing.assert_close(y[0, 20:], embeds.y[16:])
    torch.testing.assert_close(kwargs["reference"][1], embeds.reference)

    # Wan 2.1 Fun V1.1: the same embeds without the mask channels; no ref_image -> a zero reference frame
    (plain,) = node.encode(vae, 32, 32, 9, True, False, control_video=video)
    handle21 = _handle(_fun21_v11_control())
    seen21 = _capture(handle21)
    _sample(handle21, plain)
    args, kwargs = seen21[0]
    assert args[4].shape[1] == 32 and (kwargs["reference"] == 0).all() and kwargs["reference"].shape[1:] == (16, 4, 4)


def test_fun_bad_inputs_get_clear_errors(vae):
    g = torch.Generator().manual_seed(1)
    video, ref_image = torch.rand(9, 32, 32, 3, generator=g), torch.rand(1, 32, 32, 3, generator=g)
    node = N["SlipstreamWanFunControlEncode"]()
    (with_ref,) = node.encode(vae, 32, 32, 9, True, False, control_video=video, ref_image=ref_image)
    v10 = _handle(replace(wan_config.tiny("i2v", num_layers=1, text_dim=TEXT_DIM, clip_dim=CLIP_DIM), in_dim=48))
    with pytest.raises(ValueError, match="reference image .* has no reference adapter.*disconnect ref_image"):
        _sample(v10, with_ref)
    with pytest.raises(ValueError, match="control_video has 9 frames but num_frames is 13"):
        node.encode(vae, 32, 32, 13, True, False, control_video=video)
    with pytest.raises(ValueError, match="control_video is 32x32 but the video is 64x32"):
        node.encode(vae, 64, 32, 9, True, False, control_video=video)
    with pytest.raises(ValueError, match="ref_image must be an IMAGE batch"):
        node.encode(vae, 32, 32, 9, True, False, ref_image=torch.zeros(0, 8, 8, 3))
    vae22 = WanVAEHandle(Wan22VAE(TINY_VAE22), "tiny22", CPU)
    with pytest.raises(ValueError, match="needs the Wan 2.1 VAE"):
        node.encode(vae22, 32, 32, 9, True, False, control_video=video)
    with pytest.raises(ValueError, match="needs the Wan 2.1 VAE"):
        N["SlipstreamWanFunInpaintEncode"]().encode(vae22, 32, 32, 9, True, False)
    wrong = replace(with_ref, reference=with_ref.reference[:, :2])
    with pytest.raises(ValueError, match=r"reference latent is \(16, 2, 4\)"):
        _sample(_handle(_fun22_control(layers=1)), wrong)


# ------------------------------------------------------------------------------------------ Phantom guidance


def test_phantom_combine_is_the_official_formula_by_hand():
    ts, s, n = torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])
    # 1 + 5·(2 − 1) + 7.5·(3 − 2) = 13.5;  1 + 5·(0.5 − 1) + 7.5·(−1 − 0.5) = −12.75
    torch.testing.assert_close(phantom_combine(ts, s, n, 7.5, 5.0), torch.tensor([13.5, -12.75]))
    # equal scales: plain CFG between text+subject and the negative without subject
    torch.testing.assert_close(phantom_combine(ts, s, n, 4.0, 4.0), combine(ts, n, 4.0, False))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "passes"])
def test_phantom_subject_cfg_runs_three_branches_and_combines_them_officially(vae, batched):
    images = torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(5))
    (embeds,) = N["SlipstreamWanPhantomSubjectEncode"]().encode(vae, images, 32, 32, 5, True, subject_cfg=5.0)
    assert embeds.subject_cfg == 5.0
    handle = _handle(wan_config.tiny("t2v", num_layers=2, text_dim=TEXT_DIM))
    text = _text()
    stats = RunStats()
    denoiser = WanDenoiser(handle, text, embeds, batched, CPU, None, None, None, stats, SamplingExtras())
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    with torch.no_grad():
        v = denoiser(x, 600.0, 0, 2, 7.5)
        dit, t = handle.dit, torch.tensor([600.0])
        subject = embeds.subject[None]
        with_subject, without = torch.cat([x, subject], 2), torch.cat([x, torch.zeros_like(subject)], 2)
        text_subject = dit(with_subject, t, text.positive[0][None])[:, :, :2]
        subject_only = dit(with_subject, t, text.negative[None])[:, :, :2]
        neither = dit(without, t, text.negative[None])[:, :, :2]
    expected = neither + 5.0 * (subject_only - neither) + 7.5 * (text_subject - subject_only)
    torch.testing.assert_close(v, expected, atol=1e-5, rtol=1e-4)
    assert stats.forwards == (1 if batched else 3) and stats.branches_computed == 3


@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_phantom_third_branch_goes_through_every_step_cache(vae, method):
    """The negative-with-subjects branch (row 2) has its own cache state and report entry; with EasyCache
    it follows the step's one decision like the other two."""
    from slipstream.models.wan.step_cache import CacheArgs, StepCache

    images = torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(5))
    (embeds,) = N["SlipstreamWanPhantomSubjectEncode"]().encode(vae, images, 32, 32, 5, True, subject_cfg=5.0)
    handle = _handle(wan_config.tiny("t2v", num_layers=2, text_dim=TEXT_DIM))
    steps = 6
    cache = StepCache(CacheArgs(method, 1.0, start_step=1, retention=0.0, magcache_k=4), handle.config.dim,
                      "t2v", 32 * 32, steps)
    denoiser = WanDenoiser(handle, _text(), embeds, False, CPU, None, None, None, RunStats(),
                           SamplingExtras(cache=cache))
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for step in range(steps):
            v = denoiser(x, 1000.0 * (1 - step / steps), step, steps, 7.5)
            x = x - v / steps
    assert torch.isfinite(x).all()
    counts = {b: cache.report.computed.get(b, 0) + cache.report.skipped.get(b, 0) for b in cache.report.computed}
    assert counts == {"cond": steps, "uncond": steps, "uncond+subject": steps}
    if method == "easycache":
        assert len(set(cache.report.skipped.values())) == 1, "the three branches skip the same steps"


def test_phantom_subject_cfg_bad_wiring_is_refused(vae):
    images = torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(5))
    node = N["SlipstreamWanPhantomSubjectEncode"]()
    with pytest.raises(ValueError, match="subject_cfg must be a finite number >= 0"):
        node.encode(vae, images, 32, 32, 5, True, subject_cfg=-1.0)
    (embeds,) = node.encode(vae, images, 32, 32, 5, True, subject_cfg=5.0)
    i2v = _handle(wan_config.tiny("i2v", num_layers=1, text_dim=TEXT_DIM, image_context=False))
    with pytest.raises(ValueError, match="Phantom subject images go with a text-to-video"):
        _sample(i2v, replace(embeds, y=torch.zeros(20, 2, 4, 4)))
    t2v = _handle(wan_config.tiny("t2v", num_layers=1, text_dim=TEXT_DIM))
    with pytest.raises(ValueError, match="subject_cfg .* needs Phantom subject frames"):
        _sample(t2v, WanImageEmbeds(32, 32, 5, subject_cfg=5.0))
    with pytest.raises(ValueError, match="CFG-Zero\\* and Phantom's subject_cfg do not combine"):
        WanDenoiser(t2v, _text(), embeds, True, CPU, None, None, None, RunStats(),
                    SamplingExtras(guidance=GuidanceArgs(cfg_zero_star=True)))
