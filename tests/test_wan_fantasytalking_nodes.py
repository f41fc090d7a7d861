"""Wan FantasyTalking Audio Embeds: inputs, frame rounding, the audio fitted to the video, notices, and the
conditioning it hands the sampler, through a tiny real wav2vec2 and into a tiny FantasyTalking Wan DiT."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import slipstream.models.audio as audio_package
import torch
from slipstream.host import add_notice_hook
from slipstream.models.finite import BadSettingError
from slipstream.models.wan import config as wc
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.fantasytalking import FantasyTalkingAdapter, FantasyTalkingConditioning
from slipstream.nodes.wan_fantasytalking import WanFantasyTalkingEmbeds, round_frames

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from fantasytalking_fixtures import random_fantasytalking  # noqa: E402
from speech_fixtures import tiny_speech_encoder  # noqa: E402

SAMPLES_PER_TOKEN = 20           # the tiny encoder's conv stride (the real one: 320, 50 tokens per second)


@dataclass
class Encoder:
    """Just the attributes the node reads before encoding (for refusals that come first)."""

    name: str = "wav2vec2-large"
    expects_normalized: bool = True
    config: dict = field(default_factory=lambda: {"hidden_size": 1024})


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_speech_encoder(tmp_path_factory.mktemp("speech"), name="wav2vec2-base-960h")


@pytest.fixture
def speech(monkeypatch):
    """Records the calls to the speech package's fantasytalking_features (the real one does the work)."""
    calls = []
    real = audio_package.fantasytalking_features

    def spy(encoder, waveform_16k, num_frames, fps, **kw):
        calls.append((encoder, waveform_16k, num_frames, fps))
        return real(encoder, waveform_16k, num_frames, fps, **kw)

    monkeypatch.setattr(audio_package, "fantasytalking_features", spy)
    return calls


@pytest.fixture
def notices():
    seen = []
    remove = add_notice_hook(lambda node, message: seen.append((node, message)))
    yield seen
    remove()


def tone(seconds: float, rate: int = 16000, channels: int = 2) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    return {"waveform": torch.sin(2 * torch.pi * 220 * t).repeat(1, channels, 1) * 0.3, "sample_rate": rate}


def test_node_declares_its_sockets_with_tooltips():
    spec = WanFantasyTalkingEmbeds.INPUT_TYPES()["required"]
    assert spec["speech_encoder"][0] == "SLIPSTREAM_SPEECH_ENCODER" and spec["audio"][0] == "AUDIO"
    assert spec["frame_rate"][1]["default"] == 23.0 and spec["audio_scale"][1]["default"] == 1.0
    assert all("tooltip" in options for _, options in spec.values())
    assert WanFantasyTalkingEmbeds.RETURN_TYPES == ("SLIPSTREAM_WAN_AUDIO", "AUDIO")
    assert WanFantasyTalkingEmbeds.CATEGORY.startswith("Slipstream/")


def tokens(samples: int) -> int:
    """The tiny encoder's frame count for `samples` (conv kernels 10, 3, 2; strides 5, 2, 2)."""
    n = (samples - 10) // 5 + 1
    n = (n - 3) // 2 + 1
    return (n - 2) // 2 + 1


def test_embeds_cover_the_video_and_the_audio_is_fitted(encoder, speech, notices):
    audio = tone(5.0)
    cond, fitted = WanFantasyTalkingEmbeds().encode(encoder, audio, 81, 23.0, 0.8)
    assert isinstance(cond, FantasyTalkingConditioning) and cond.family == "fantasytalking"
    assert (cond.num_frames, cond.fps, cond.audio_scale, cond.latent_frames) == (81, 23.0, 0.8, 21)
    assert cond.features.shape == (1, tokens(int(81 / 23 * 16000)), 128) and cond.features.dtype == torch.float32
    (_, wave, frames, fps), = speech
    assert (frames, fps) == (81, 23.0) and wave.shape == (80000,)          # the whole mono track goes in
    assert fitted["sample_rate"] == 16000 and fitted["waveform"].shape == (1, 2, int(81 / 23 * 16000) + 1)
    assert torch.equal(fitted["waveform"], audio["waveform"][:, :, :fitted["waveform"].shape[-1]])
    assert any("the rest of the audio is not used" in m for _, m in notices)


def test_short_audio_is_padded_with_silence_and_frames_are_rounded(encoder, speech, notices):
    audio = tone(1.0, rate=22050, channels=1)
    cond, fitted = WanFantasyTalkingEmbeds().encode(encoder, audio, 47, 23.0, 1.0)
    assert cond.num_frames == 49 and round_frames(47) == 49 and round_frames(46) == 45 and round_frames(1) == 1
    assert cond.features.shape[1] == tokens(int(49 / 23 * 16000))          # tokens for the whole video
    assert speech[0][1].shape == (16000,)                                   # resampled to 16 kHz
    assert fitted["sample_rate"] == 22050 and fitted["waveform"].shape[-1] == int(49 / 23 * 22050) + 1
    assert fitted["waveform"][..., 22050:].abs().max() == 0                  # silence after the speech
    assert any("47 frames -> 49" in m for _, m in notices) and any("padded with silence" in m for _, m in notices)


def test_the_embeds_drive_a_fantasytalking_dit_and_silence_is_not_the_null_branch(encoder, speech):
    cfg = wc.tiny("i2v", text_dim=64, clip_dim=96, num_layers=1)
    dit = WanDiT.from_state_dict(random_state_dict(cfg, seed=3))
    dit.attach_audio(FantasyTalkingAdapter.from_state_dict(random_fantasytalking(cfg, audio_dim=128), dit))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 20, 3, 4, 4, generator=g)
    ctx, clip, t = torch.randn(1, 8, 64, generator=g), torch.randn(1, 257, 96, generator=g), torch.tensor([500.0])
    speechy, _ = WanFantasyTalkingEmbeds().encode(encoder, tone(0.4), 9, 23.0, 1.0)
    silent, _ = WanFantasyTalkingEmbeds().encode(encoder, {"waveform": torch.zeros(1, 1, 6400), "sample_rate": 16000},
                                                 9, 23.0, 1.0)
    assert torch.isfinite(silent.features).all()
    outs = [dit(x, t, ctx, clip, y, audio=c) for c in (speechy, silent, silent.null())]
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_other_encoders_are_refused_or_noted(tmp_path, speech, notices):
    with pytest.raises(ValueError, match="1024 wide; FantasyTalking takes wav2vec2-base-960h"):
        WanFantasyTalkingEmbeds().encode(Encoder(), tone(1.0), 9, 23.0, 1.0)
    chinese = tiny_speech_encoder(tmp_path, name="chinese-wav2vec2-base")
    assert chinese.expects_normalized is False
    WanFantasyTalkingEmbeds().encode(chinese, tone(0.5), 9, 23.0, 1.0)
    assert any("not wav2vec2-base-960h" in m for _, m in notices)


@pytest.mark.parametrize("kwargs,words", [
    ({"speech_encoder": None}, "connect a speech encoder"),
    ({"audio": {"waveform": [0.0]}}, "ComfyUI AUDIO value"),
    ({"audio": {"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}}, "empty"),
    ({"audio": {"waveform": torch.zeros(1, 1, 10), "sample_rate": 0}}, "sample_rate"),
    ({"audio": {"waveform": torch.zeros(1, 1, 10), "sample_rate": float("inf")}}, "sample_rate"),
    ({"audio": {"waveform": torch.full((1, 1, 10), float("nan")), "sample_rate": 16000}}, "NaN"),
    ({"num_frames": 0}, "num_frames"),
    ({"frame_rate": float("nan")}, "frame_rate"),
    ({"frame_rate": 0.0}, "frame_rate must be positive"),
    ({"audio_scale": -1.0}, "audio_scale must be >= 0"),
])
def test_bad_inputs_are_explained_before_any_encoding(encoder, speech, kwargs, words):
    args = {"speech_encoder": encoder, "audio": tone(0.5), "num_frames": 9, "frame_rate": 23.0, "audio_scale": 1.0}
    args.update(kwargs)
    with pytest.raises(BadSettingError, match=words):
        WanFantasyTalkingEmbeds().encode(**args)
    assert speech == []
