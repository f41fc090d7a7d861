"""Wan 2.2 VAE: the official key layout at full size (meta), float64 references of what differs from
Wan 2.1 (patchify, the AvgDown3D / DupUp3D residual shortcuts), tiny random-weight encode/decode,
its latent statistics, and loading either generation's file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan import latents as L
from slipstream.models.wan import vae22 as V
from slipstream.models.wan.demo_assets import seeded_state_dict, tiny_vae_state_dict
from slipstream.models.wan.vae import FrameCache, WanVAE
from slipstream.models.wan.weights import build_on_meta

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_sd():
    return seeded_state_dict(lambda: V.Wan22VAE(V.TINY_VAE22), 0, lambda name, shape, noise: (
        (1.0 + 0.2 * noise) if name.endswith("gamma") else noise * (0.3 if len(shape) > 1 else 0.1)))


@pytest.fixture(scope="module")
def tiny_vae(tiny_sd):
    return V.Wan22VAE.from_state_dict(dict(tiny_sd))


def _video(frames: int, h: int = 32, w: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.rand((1, 3, frames, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- full-size architecture ---------------------------------------------------------------------

SPEC_SHAPES = {   # official Wan2.2_VAE.pth: dim 160, dec_dim 256, z 48, temporal down (False, True, True)
    "encoder.conv1.weight": (160, 12, 3, 3, 3),
    "encoder.downsamples.0.downsamples.0.residual.0.gamma": (160, 1, 1, 1),
    "encoder.downsamples.0.downsamples.2.resample.1.weight": (160, 160, 3, 3),
    "encoder.downsamples.1.downsamples.0.shortcut.weight": (320, 160, 1, 1, 1),
    "encoder.downsamples.1.downsamples.2.time_conv.weight": (320, 320, 3, 1, 1),
    "encoder.downsamples.2.downsamples.2.time_conv.weight": (640, 640, 3, 1, 1),
    "encoder.downsamples.3.downsamples.1.residual.6.weight": (640, 640, 3, 3, 3),
    "encoder.middle.1.to_qkv.weight": (1920, 640, 1, 1),
    "encoder.head.2.weight": (96, 640, 3, 3, 3),
    "conv1.weight": (96, 96, 1, 1, 1),
    "conv2.weight": (48, 48, 1, 1, 1),
    "decoder.conv1.weight": (1024, 48, 3, 3, 3),
    "decoder.upsamples.0.upsamples.3.resample.1.weight": (1024, 1024, 3, 3),
    "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
    "decoder.upsamples.1.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
    "decoder.upsamples.2.upsamples.0.shortcut.weight": (512, 1024, 1, 1, 1),
    "decoder.upsamples.2.upsamples.3.resample.1.weight": (512, 512, 3, 3),
    "decoder.upsamples.3.upsamples.2.residual.6.weight": (256, 256, 3, 3, 3),
    "decoder.head.2.weight": (12, 256, 3, 3, 3),
}


def test_full_vae_on_meta_has_the_official_keys_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in build_on_meta(lambda: V.Wan22VAE(V.WAN22_VAE)).state_dict().items()}
    assert len(shapes) == 196
    for key, shape in SPEC_SHAPES.items():
        assert shapes[key] == shape, key
    assert "decoder.upsamples.2.upsamples.3.time_conv.weight" not in shapes       # the last upsampler is 2-D
    assert not any("avg_shortcut" in k for k in shapes)                           # the shortcuts hold no weights
    assert V.Wan22VAE.config_from_shapes(shapes) == V.WAN22_VAE


# ---- formulas that differ from Wan 2.1, against float64 loops ---------------------------------------

def test_patchify_folds_2x2_pixels_into_channels_column_offset_first():
    x = torch.randn(2, 3, 2, 6, 4, dtype=torch.float64)
    out = V.patchify(x)
    assert out.shape == (2, 12, 2, 3, 2)
    for c in range(3):
        for q in range(2):          # row offset
            for r in range(2):      # column offset
                torch.testing.assert_close(out[:, c * 4 + r * 2 + q], x[:, c, :, q::2, r::2], rtol=0, atol=0)
    torch.testing.assert_close(V.unpatchify(out), x, rtol=0, atol=0)


def _avg_down_reference(x: torch.Tensor, out_dim: int, ft: int, fs: int) -> torch.Tensor:
    pad = (ft - x.shape[2] % ft) % ft
    x = torch.cat([torch.zeros(*x.shape[:2], pad, *x.shape[3:], dtype=x.dtype), x], dim=2)
    b, c, t, h, w = x.shape
    factor = ft * fs * fs
    group = c * factor // out_dim
    out = torch.zeros(b, out_dim, t // ft, h // fs, w // fs, dtype=x.dtype)
    for o in range(out_dim):
        for g in range(group):
            flat = o * group + g                      # index into the (channel, dt, dy, dx) fold
            ch, rest = divmod(flat, factor)
            dt, rest = divmod(rest, fs * fs)
            dy, dx = divmod(rest, fs)
            out[:, o] += x[:, ch, dt::ft, dy::fs, dx::fs] / group
    return out


@pytest.mark.parametrize("in_dim,out_dim,ft,fs,frames", [(4, 8, 2, 2, 1), (4, 8, 2, 2, 4), (6, 6, 1, 2, 3),
                                                         (8, 16, 2, 2, 5)])
def test_avg_down_shortcut_matches_its_formula(in_dim, out_dim, ft, fs, frames):
    x = torch.randn(2, in_dim, frames, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(frames))
    got = V.AvgDown3D(in_dim, out_dim, ft, fs)(x)
    torch.testing.assert_close(got, _avg_down_reference(x, out_dim, ft, fs), rtol=1e-12, atol=1e-12)


def _dup_up_reference(x: torch.Tensor, out_dim: int, ft: int, fs: int, first_chunk: bool) -> torch.Tensor:
    b, c, t, h, w = x.shape
    factor = ft * fs * fs
    repeats = out_dim * factor // c
    out = torch.zeros(b, out_dim, t * ft, h * fs, w * fs, dtype=x.dtype)
    for o in range(out_dim):
        for dt in range(ft):
            for dy in range(fs):
                for dx in range(fs):
                    source = (o * factor + dt * fs * fs + dy * fs + dx) // repeats
                    out[:, o, dt::ft, dy::fs, dx::fs] = x[:, source]
    return out[:, :, ft - 1:] if first_chunk else out


@pytest.mark.parametrize("in_dim,out_dim,ft", [(8, 8, 2), (8, 4, 1), (16, 8, 2)])
def test_dup_up_shortcut_matches_its_formula_and_trims_the_first_chunk(in_dim, out_dim, ft):
    x = torch.randn(1, in_dim, 2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(in_dim))
    layer = V.DupUp3D(in_dim, out_dim, ft, 2)
    cache = FrameCache()
    first = layer(x[:, :, :1], cache)
    later = layer(x, cache)
    torch.testing.assert_close(first, _dup_up_reference(x[:, :, :1], out_dim, ft, 2, True), rtol=0, atol=0)
    torch.testing.assert_close(later, _dup_up_reference(x, out_dim, ft, 2, False), rtol=0, atol=0)
    assert first.shape[2] == 1


def test_residual_stages_add_the_shortcut_to_the_main_path(tiny_vae):
    stage = tiny_vae.encoder.downsamples[1]          # temporal + spatial downsampling
    x = torch.randn(1, stage.downsamples[0].residual[0].gamma.shape[0], 1, 8, 8)
    cache = FrameCache()
    main_cache = FrameCache()
    out = stage(x, cache)
    from slipstream.models.wan.vae import _run_layers

    expected = _run_layers(stage.downsamples, x, main_cache) + stage.avg_shortcut(x)
    torch.testing.assert_close(out, expected)


# ---- tiny model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,latents", [(1, 1), (5, 2), (9, 3)])
def test_encode_decode_shapes(tiny_vae, frames, latents):
    z = tiny_vae.encode(_video(frames))
    assert z.shape == (1, 48, latents, 2, 3) and z.dtype == torch.float32
    out = tiny_vae.decode(z)
    assert out.shape == (1, 3, frames, 32, 48) and out.abs().max() <= 1.0


def test_chunked_processing_is_causal(tiny_vae):
    video = _video(9)
    z9 = tiny_vae.encode(video)
    z5 = tiny_vae.encode(video[:, :, :5])
    torch.testing.assert_close(z5, z9[:, :, :2], atol=1e-5, rtol=1e-5)
    d9 = tiny_vae.decode(z9)
    d5 = tiny_vae.decode(z9[:, :, :2])
    torch.testing.assert_close(d5, d9[:, :, :5], atol=1e-5, rtol=1e-5)


def test_bad_video_size_names_the_16_pixel_grid(tiny_vae):
    with pytest.raises(ValueError, match="divisible by 16"):
        tiny_vae.encode(_video(1, h=24, w=48))


def test_latent_statistics_are_wan22s_and_chosen_by_channel_count():
    z = torch.randn(1, 48, 2, 3, 3, dtype=torch.float64)
    n = L.normalize_latent(z)
    for c in (0, 19, 47):
        torch.testing.assert_close(n[:, c], (z[:, c] - L.WAN22_MEAN[c]) / L.WAN22_STD[c])
    assert L.WAN22_MEAN[0] == -0.2289 and L.WAN22_STD[47] == 0.7744 and len(L.WAN22_STD) == 48
    torch.testing.assert_close(L.denormalize_latent(n), z)
    assert L.latent_generation(z) == "2.2" and L.latent_generation(torch.zeros(1, 16, 1)) == "2.1"


# ---- loading ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
def test_load_wan_vae_opens_either_generation_under_any_prefix(tmp_path, tiny_sd, prefix):
    path22 = tmp_path / "wan2.2_vae.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in tiny_sd.items()}, str(path22))
    path21 = tmp_path / "wan_2.1_vae.safetensors"
    save_file({prefix + k: v for k, v in tiny_vae_state_dict().items()}, str(path21))
    vae22 = V.load_wan_vae(str(path22))
    assert isinstance(vae22, V.Wan22VAE) and vae22.GENERATION == "2.2" and vae22.config == V.TINY_VAE22
    vae21 = V.load_wan_vae(str(path21))
    assert type(vae21) is WanVAE and vae21.GENERATION == "2.1"
    with pytest.raises(CheckpointError, match="Wan 2.2 VAE"):
        WanVAE.from_file(str(path22))
    with pytest.raises(CheckpointError, match="Wan 2.1 VAE"):
        V.Wan22VAE.from_file(str(path21))
