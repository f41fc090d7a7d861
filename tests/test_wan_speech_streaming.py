"""Streaming long speech video: the clip plan, each later clip's conditioning from the previous clip's last
frames (MultiTalk and InfiniteTalk ways), the official overlap treatment (the later clip's first motion
frames are dropped, not blended), exactly the asked-for frame count, and the errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from slipstream.models.wan import streaming
from slipstream.models.wan.demo_assets import tiny_vae_state_dict
from slipstream.models.wan.encoders import WanVAEHandle, i2v_mask
from slipstream.models.wan.pipeline import SampleResult, SamplerSettings
from slipstream.models.wan.streaming import Clip, StreamSettings, clip_plan, stream_speech_video
from slipstream.models.wan.vae import TINY_VAE, WanVAE, normalize_latent
from wan_speech_fixtures import CPU, tiny_i2v_embeds, tiny_i2v_handle, tiny_text, toy_audio

pytestmark = pytest.mark.usefixtures("single_thread")


def test_clip_plan_follows_the_official_stride_and_ends_exactly_at_the_asked_length():
    # official 81-frame clips with 25 motion frames: clip k starts at k·56
    plan = clip_plan(300, 81, 25)
    assert [c.start for c in plan[:-1]] == [0, 56, 112, 168] and all(c.length == 81 for c in plan[:-1])
    assert [c.keep for c in plan] == [0, 25, 25, 25, 26]
    for total, clip, motion in [(300, 81, 25), (41, 17, 5), (45, 17, 5), (200, 81, 25), (81, 81, 25), (10, 17, 5)]:
        plan = clip_plan(total, clip, motion)
        new = sum(c.length - c.keep for c in plan)
        assert plan[0].start == 0 and new >= total
        if len(plan) > 1:
            assert new == total and plan[-1].start + plan[-1].length == total
            assert all((c.length - 1) % 4 == 0 and c.keep >= motion for c in plan[1:])
            # every new frame follows the previous clip's end: no gaps, no frame twice
            ends = [c.start + c.length for c in plan]
            assert all(c.start + c.keep == end for c, end in zip(plan[1:], ends, strict=False))
    with pytest.raises(ValueError, match="fewer than the clip"):
        clip_plan(100, 25, 25)


@pytest.mark.parametrize("bad", [0, 4, 24, 2])
def test_motion_frames_must_be_whole_latent_frames(bad):
    with pytest.raises(ValueError, match="motion_frames must be 1 \\+ 4k"):
        StreamSettings(100, bad)


@pytest.fixture(scope="module")
def vae():
    model = WanVAE(TINY_VAE).eval()
    model.load_state_dict(tiny_vae_state_dict())
    return WanVAEHandle(model, "tiny", CPU)


class _FakeSampler:
    """Stands in for sample_video_full: records what each clip got, returns a seeded random latent."""

    def __init__(self):
        self.calls = []

    def __call__(self, handle, text, image, settings, *, device, extras, **kwargs):
        self.calls.append((image, extras.audio, settings.seed))
        g = torch.Generator().manual_seed(100 + len(self.calls))
        latent = torch.randn(1, 16, (image.num_frames - 1) // 4 + 1, image.height // 8, image.width // 8, generator=g)
        return SampleResult(latent, latent)


def _encode(vae, pixels):
    with torch.no_grad():
        return normalize_latent(vae.vae.encode(pixels[None]))[0]


@pytest.mark.parametrize("mode", ["multitalk", "infinitetalk"])
def test_each_clip_continues_from_the_last_frames_and_the_overlap_is_dropped(vae, monkeypatch, mode):
    fake = _FakeSampler()
    monkeypatch.setattr(streaming, "sample_video_full", fake)
    image = tiny_i2v_embeds(frames=17)
    audio = toy_audio("multitalk", 45)
    decoded = {}
    frames = stream_speech_video(tiny_i2v_handle(), tiny_text(), image, audio, SamplerSettings(steps=2, seed=7),
                                 StreamSettings(45, 5, mode), vae=vae, device=CPU,
                                 on_clip=lambda i, clip, f: decoded.__setitem__(i, (clip, f)))
    plan = clip_plan(45, 17, 5)
    assert len(plan) == 4 and len(fake.calls) == 4
    assert frames.shape == (45, 32, 32, 3), "exactly the frames asked for"
    # the video is clip 0 whole, then every later clip without its first `keep` frames (official: no blending)
    expected = torch.cat([decoded[0][1]] + [decoded[i][1][plan[i].keep:] for i in range(1, 4)])
    assert torch.equal(frames, expected)
    for i, (embeds, clip_audio, seed) in enumerate(fake.calls):
        clip = plan[i]
        assert seed == 7 + i and embeds.num_frames == clip.length
        assert (clip_audio.start, clip_audio.num_frames) == (clip.start, clip.length), "the clip's own audio"
        if i == 0:
            assert torch.equal(embeds.y, image.y[:, :(clip.length - 1) // 4 + 1])
            assert (embeds.motion is None) == (mode == "multitalk")
            continue
        prev_clip, prev = decoded[i - 1]
        offset = clip.start - prev_clip.start
        motion_pixels = prev[offset:offset + 5].permute(3, 0, 1, 2) * 2 - 1
        if i < 3:
            assert offset == prev_clip.length - 5, "official: the previous clip's last motion_frames frames"
        if mode == "multitalk":
            grey = torch.zeros(3, clip.length, 32, 32)
            grey[:, :5] = motion_pixels
            latent = _encode(vae, grey)
            assert torch.allclose(embeds.y[4:], latent, atol=1e-5)
            assert torch.equal(embeds.y[:4], i2v_mask(clip.length, 4, 4, known_frames=5))
            assert embeds.motion.mode == "noised" and torch.allclose(embeds.motion.latent, latent[:, :2], atol=1e-5)
        else:
            assert torch.equal(embeds.y, image.y[:, :(clip.length - 1) // 4 + 1]), "the start image stays the reference"
            assert embeds.motion.mode == "clean"
            assert torch.allclose(embeds.motion.latent, _encode(vae, motion_pixels), atol=1e-5)


def test_a_real_streamed_run_holds_the_motion_latents_and_reports_progress(vae, monkeypatch):
    results = []
    real = streaming.sample_video_full

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        results.append((args[2], out.latent))
        return out

    monkeypatch.setattr(streaming, "sample_video_full", spy)
    seen = []
    frames = stream_speech_video(tiny_i2v_handle(), tiny_text(), tiny_i2v_embeds(frames=9), toy_audio("multitalk", 21),
                                 SamplerSettings(steps=2, cfg=5.0, seed=1), StreamSettings(21, 5, "multitalk"),
                                 vae=vae, device=CPU, progress=lambda d, t: seen.append((d, t)))
    assert frames.shape == (21, 32, 32, 3) and len(results) == len(clip_plan(21, 9, 5)) == 4
    assert seen[-1] == (8, 8) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    for embeds, latent in results[1:]:
        held = normalize_latent(latent)[0, :, :embeds.motion.frames]
        assert torch.allclose(held, embeds.motion.latent, atol=1e-5), "σ = 0 at the end: the clean motion latents"


def test_streaming_refuses_what_it_cannot_make(vae):
    handle, text, image = tiny_i2v_handle(), tiny_text(), tiny_i2v_embeds(frames=17)
    settings = SamplerSettings(steps=1)
    with pytest.raises(ValueError, match="cover 30 frames.*need audio for 45"):
        stream_speech_video(handle, text, image, toy_audio("multitalk", 30), settings, StreamSettings(45, 5),
                            vae=vae, device=CPU)
    with pytest.raises(ValueError, match="fantasytalking has no official long-video mode"):
        stream_speech_video(tiny_i2v_handle("fantasytalking"), text, image, toy_audio("fantasytalking", 45), settings,
                            StreamSettings(45, 5), vae=vae, device=CPU)
    with pytest.raises(ValueError, match="needs audio embeds"):
        stream_speech_video(handle, text, image, None, settings, StreamSettings(45, 5), vae=vae, device=CPU)
    with pytest.raises(ValueError, match="fewer than the clip"):
        stream_speech_video(handle, text, image, toy_audio("multitalk", 45), settings, StreamSettings(45, 17),
                            vae=vae, device=CPU)
    assert Clip(0, 17, 0).motion == 0
