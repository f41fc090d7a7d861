"""Wan 2.1 VAE: real key layout at full size (meta), tiny random-weight encode/decode, loading, tiling."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan import vae as V
from slipstream.models.wan.demo_assets import seeded_state_dict
from slipstream.models.wan.tiling import Tiling, run_tiled, tile_starts
from slipstream.models.wan.weights import build_on_meta

pytestmark = pytest.mark.usefixtures("single_thread")


def _random_tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tiny-config weights drawn so that every layer matters (gains around 1, non-zero biases)."""
    return seeded_state_dict(lambda: V.WanVAE(V.TINY_VAE), seed, lambda name, shape, noise: (
        (1.0 + 0.2 * noise) if name.endswith("gamma") else noise * (0.3 if len(shape) > 1 else 0.1)))


@pytest.fixture(scope="module")
def tiny_sd():
    return _random_tiny_state_dict()


@pytest.fixture(scope="module")
def tiny_vae(tiny_sd):
    return V.WanVAE.from_state_dict(dict(tiny_sd))


def _video(frames: int, h: int = 16, w: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.rand((1, 3, frames, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- full-size architecture ---------------------------------------------------------------------

SPEC_SHAPES = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.6.shortcut.weight": (384, 192, 1, 1, 1),
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.proj.weight": (384, 384, 1, 1),
    "encoder.head.0.gamma": (384, 1, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.7.time_conv.bias": (768,),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.head.0.gamma": (96, 1, 1, 1),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}


def test_full_vae_on_meta_has_the_official_keys_and_shapes():
    sd = build_on_meta(lambda: V.WanVAE()).state_dict()
    assert len(sd) == 194
    assert sum(t.numel() for t in sd.values()) == 126_892_531
    for key, shape in SPEC_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    res_enc = {f"encoder.downsamples.{i}" for i in (0, 1, 3, 4, 6, 7, 9, 10)}
    res_dec = {f"decoder.upsamples.{i}" for i in (0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14)}
    for block in res_enc | res_dec | {"encoder.middle.0", "encoder.middle.2", "decoder.middle.0", "decoder.middle.2"}:
        for part in ("residual.0.gamma", "residual.2.weight", "residual.2.bias", "residual.3.gamma",
                     "residual.6.weight", "residual.6.bias"):
            assert f"{block}.{part}" in sd, f"{block}.{part}"
    assert not any(k.startswith("encoder.downsamples.2.time_conv") for k in sd)  # downsample2d has no time conv
    assert sum(isinstance(m, V.CausalConv3d) for m in build_on_meta(lambda: V.Encoder3d(V.WAN21_VAE)).modules()) == 26
    assert sum(isinstance(m, V.CausalConv3d) for m in build_on_meta(lambda: V.Decoder3d(V.WAN21_VAE)).modules()) == 33


def test_tiny_config_keeps_the_structure():
    full = build_on_meta(lambda: V.WanVAE()).state_dict()
    tiny = build_on_meta(lambda: V.WanVAE(V.TINY_VAE)).state_dict()
    assert list(full) == list(tiny)


# ---- encode / decode ---------------------------------------------------------------------------

@pytest.mark.parametrize("frames,latents", [(1, 1), (5, 2), (9, 3)])
def test_encode_decode_shapes(tiny_vae, frames, latents):
    z = tiny_vae.encode(_video(frames))
    assert z.shape == (1, 16, latents, 2, 3) and z.dtype == torch.float32
    out = tiny_vae.decode(z)
    assert out.shape == (1, 3, frames, 16, 24) and out.dtype == torch.float32
    assert torch.isfinite(z).all() and torch.isfinite(out).all()
    assert out.abs().max() <= 1.0 and out.std() > 0.01


def test_deterministic_and_weights_from_seed(tiny_sd):
    a = V.WanVAE.from_state_dict(dict(tiny_sd))
    b = V.WanVAE.from_state_dict(_random_tiny_state_dict(seed=0))
    x = _video(5)
    za, zb = a.encode(x), b.encode(x)
    assert torch.equal(za, zb)
    assert torch.equal(a.decode(za), b.decode(zb))
    other = V.WanVAE.from_state_dict(_random_tiny_state_dict(seed=3))
    assert not torch.allclose(other.encode(x), za)


def test_chunked_processing_is_causal(tiny_vae):
    """Later frames never change earlier latents or frames: encoding a prefix gives the prefix."""
    x = _video(9)
    z = tiny_vae.encode(x)
    assert torch.allclose(tiny_vae.encode(x[:, :, :5]), z[:, :, :2], atol=1e-5)
    out = tiny_vae.decode(z)
    assert torch.allclose(tiny_vae.decode(z[:, :, :2]), out[:, :, :5], atol=1e-5)
    changed = x.clone()
    changed[:, :, 8] = 0
    assert torch.allclose(tiny_vae.encode(changed)[:, :, :2], z[:, :, :2], atol=1e-5)


def test_bf16_tracks_fp32(tiny_sd):
    fp32 = V.WanVAE.from_state_dict(dict(tiny_sd))
    bf16 = V.WanVAE.from_state_dict(dict(tiny_sd), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    x = _video(5)
    z32, z16 = fp32.encode(x), bf16.encode(x)
    assert z16.dtype == torch.float32 and torch.isfinite(z16).all()
    assert (z16 - z32).abs().mean() < 0.05 * z32.abs().mean()
    out16 = bf16.decode(z32)
    assert torch.isfinite(out16).all()
    assert (out16 - fp32.decode(z32)).abs().mean() < 0.05


def test_batch_items_are_independent(tiny_vae):
    x = torch.cat([_video(5, seed=1), _video(5, seed=2)])
    z = tiny_vae.encode(x)
    assert torch.allclose(z[1:], tiny_vae.encode(x[1:]), atol=1e-5)


def test_bad_video_shapes_are_explained(tiny_vae):
    with pytest.raises(ValueError, match="1\\+4k frames.*Trim to 5 or pad to 9"):
        tiny_vae.encode(_video(7))
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_vae.encode(_video(1, h=20))
    with pytest.raises(ValueError, match="\\[B,3,F,H,W\\]"):
        tiny_vae.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="latent"):
        tiny_vae.decode(torch.zeros(1, 4, 1, 2, 2))


def test_progress_callback_and_interrupt(tiny_vae):
    seen = []
    z = tiny_vae.encode(_video(9), callback=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    tiny_vae.decode(z, callback=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    class Stop(Exception):
        pass

    def stop_at_two(done, total):
        if done == 2:
            raise Stop
    with pytest.raises(Stop):
        tiny_vae.decode(z, callback=stop_at_two)


# ---- latent statistics -------------------------------------------------------------------------

def test_latent_normalisation_follows_its_formula():
    z = torch.randn(2, 16, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n = V.normalize_latent(z)
    for c in range(16):
        assert torch.allclose(n[:, c], (z[:, c] - V.LATENT_MEAN[c]) / V.LATENT_STD[c])
    assert torch.allclose(V.denormalize_latent(n), z)
    assert V.LATENT_MEAN[0] == -0.7571 and V.LATENT_STD[15] == 1.9160
    assert V.normalize_latent(z.float()).dtype == torch.float32
    half = V.normalize_latent(z.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.allclose(half.double(), n, atol=0.05)
    with pytest.raises(ValueError, match="16 channels"):
        V.normalize_latent(torch.zeros(1, 4, 1, 2, 2))


def test_frame_count_helpers():
    assert [V.latent_frames(f) for f in (1, 5, 9, 81)] == [1, 2, 3, 21]
    assert [V.pixel_frames(t) for t in (1, 2, 3, 21)] == [1, 5, 9, 81]


# ---- loading -----------------------------------------------------------------------------------

def test_official_comfy_and_kijai_files_load_the_same(tiny_sd, tmp_path):
    official = tmp_path / "wan_2.1_vae.safetensors"
    save_file(tiny_sd, str(official))
    allinone = tmp_path / "wan_all_in_one.safetensors"
    extra = {"model.diffusion_model.head.modulation": torch.zeros(1, 2, 8),
             "text_encoders.umt5xxl.transformer.shared.weight": torch.zeros(4, 8)}
    save_file({**{"vae." + k: v for k, v in tiny_sd.items()}, **extra}, str(allinone))
    kijai = tmp_path / "Wan2_1_VAE_bf16.safetensors"
    save_file({"model." + k: v.to(torch.bfloat16) for k, v in tiny_sd.items()}, str(kijai))

    x = _video(5)
    ref = V.WanVAE.from_file(str(official)).encode(x)
    assert torch.equal(V.WanVAE.from_file(str(allinone)).encode(x), ref)
    from_kijai = V.WanVAE.from_file(str(kijai))
    assert from_kijai.dtype == torch.bfloat16
    assert torch.isfinite(from_kijai.encode(x)).all()
    upcast = V.WanVAE.from_file(str(kijai), dtype=torch.float32).encode(x)
    assert (upcast - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_loading_assigns_the_file_tensors_without_copying(tiny_sd):
    sd = dict(tiny_sd)
    vae = V.WanVAE.from_state_dict(sd)
    assert vae.decoder.conv1.weight.data_ptr() == tiny_sd["decoder.conv1.weight"].data_ptr()
    half = V.WanVAE.from_state_dict(sd, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and sd["decoder.conv1.weight"].dtype == torch.float32  # caller's dict untouched
    consumed = {**{"vae." + k: v for k, v in tiny_sd.items()}, "other.weight": torch.zeros(1)}
    V.WanVAE.from_state_dict(consumed, dtype=torch.bfloat16, consume=True)
    assert list(consumed) == ["other.weight"]  # the VAE's tensors were handed over, the rest stays


def test_missing_or_wrong_tensor_is_named(tiny_sd):
    missing = dict(tiny_sd)
    del missing["decoder.upsamples.7.time_conv.weight"]
    with pytest.raises(CheckpointError, match="decoder.upsamples.7.time_conv.weight"):
        V.WanVAE.from_state_dict(missing)
    wrong = dict(tiny_sd)
    wrong["encoder.middle.1.proj.weight"] = torch.zeros(32, 32, 1, 2)
    with pytest.raises(CheckpointError, match=r"encoder.middle.1.proj.weight \(32, 32, 1, 2\)"):
        V.WanVAE.from_state_dict(wrong)
    with pytest.raises(CheckpointError, match="not a Wan 2.1 VAE"):
        V.WanVAE.from_state_dict({"blocks.0.attn.q.weight": torch.zeros(2, 2)})
    wan22 = dict(tiny_sd)
    wan22["conv2.weight"] = torch.zeros(48, 48, 1, 1, 1)
    with pytest.raises(CheckpointError, match="Wan 2.2"):
        V.WanVAE.from_state_dict(wan22)


def test_truncated_file_fails_clearly(tiny_sd, tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(tiny_sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        V.WanVAE.from_file(str(path))


# ---- tiling ------------------------------------------------------------------------------------

def test_tile_starts_cover_the_axis():
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(40, 16, 4) == [0, 12, 24]
    for length, tile, overlap in [(40, 16, 4), (33, 8, 3), (17, 16, 0), (100, 32, 8)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_tiled_blend_is_exact_for_a_pointwise_decoder():
    """With a decoder that has no spatial context, tiles agree, so the blend must reproduce it exactly."""
    z = torch.randn(1, 16, 3, 11, 13)
    weight = torch.randn(3, 16)

    def pointwise(t, progress):
        up = torch.einsum("oc,bcthw->bothw", weight, t)
        return up.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)

    whole = pointwise(z, None)
    for tiling in (Tiling(tile=4, overlap=2), Tiling(tile=5, overlap=1), Tiling(tile=6, overlap=0)):
        assert torch.allclose(run_tiled(pointwise, z, tiling, 1, 8), whole, atol=1e-5)


def test_tiled_decode_equals_untiled_when_one_tile_covers_the_frame(tiny_vae):
    z = tiny_vae.encode(_video(5, h=32, w=32))
    assert torch.allclose(tiny_vae.decode(z, tiling=Tiling(tile=4, overlap=1)), tiny_vae.decode(z), atol=1e-6)


def test_tiled_decode_and_encode_blend_many_tiles(tiny_vae):
    x = _video(5, h=48, w=64)
    z = tiny_vae.encode(x)
    seen = []
    tiled = tiny_vae.decode(z, tiling=Tiling(tile=3, overlap=1), callback=lambda d, t: seen.append((d, t)))
    assert tiled.shape == (1, 3, 5, 48, 64) and torch.isfinite(tiled).all()
    # 3 row tiles x 4 column tiles x 2 latent frames
    assert seen[-1] == (24, 24) and len(seen) == 24
    untiled = tiny_vae.decode(z)
    assert (tiled - untiled).abs().mean() < untiled.abs().mean()
    z_tiled = tiny_vae.encode(x, tiling=Tiling(tile=4, overlap=2))
    assert z_tiled.shape == z.shape and torch.isfinite(z_tiled).all()


def test_tiling_rejects_bad_sizes():
    with pytest.raises(ValueError, match="overlap"):
        Tiling(tile=4, overlap=4)
    assert Tiling.from_pixels(272, 64) == Tiling(tile=34, overlap=8)
