"""Wan FantasyTalking Audio Embeds: inputs, frame rounding, the audio fitted to the video, notices, and the
conditioning it hands the sampler (speech-encoder calls recorded through a stand-in with the package's API)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from slipstream.host import add_notice_hook
from slipstream.models.finite import BadSettingError
from slipstream.models.wan.fantasytalking import FantasyTalkingConditioning
from slipstream.nodes.wan_fantasytalking import WanFantasyTalkingEmbeds, round_frames


@dataclass
class Encoder:
    name: str = "wav2vec2-base-960h"
    expects_normalized: bool = True
    config: dict = field(default_factory=lambda: {"hidden_size": 768})


@pytest.fixture
def speech(monkeypatch):
    """The speech-encoder package's two functions, recording their calls: mono 16 kHz waveform; one
    768-wide token per 320 samples of the first int(num_frames / fps · 16000) samples, silence-padded."""
    calls = []

    def prepare_waveform(audio, *, sample_rate=16000, loudness_lufs=None):
        assert audio["sample_rate"] == sample_rate and loudness_lufs is None
        return audio["waveform"][0].mean(0).float()

    def fantasytalking_features(encoder, waveform_16k, num_frames, fps, *, progress=None):
        calls.append((encoder, waveform_16k, num_frames, fps))
        samples = int(num_frames / fps * 16000)
        wave = torch.nn.functional.pad(waveform_16k[:samples], (0, max(0, samples - waveform_16k.shape[0])))
        frames = wave[: samples // 320 * 320].view(-1, 320)
        if progress is not None:
            progress(1, 1)
        return (frames[:, :1] * torch.linspace(-1, 1, 768)).unsqueeze(0)

    fake = types.ModuleType("slipstream.models.audio")
    fake.prepare_waveform, fake.fantasytalking_features = prepare_waveform, fantasytalking_features
    if "slipstream.models.audio" not in sys.modules:          # the real package, once there, is used as is
        monkeypatch.setitem(sys.modules, "slipstream.models.audio", fake)
    else:
        monkeypatch.setattr(sys.modules["slipstream.models.audio"], "prepare_waveform", prepare_waveform)
        monkeypatch.setattr(sys.modules["slipstream.models.audio"], "fantasytalking_features", fantasytalking_features)
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


def test_embeds_cover_the_video_and_the_audio_is_fitted(speech, notices):
    audio = tone(5.0)
    cond, fitted = WanFantasyTalkingEmbeds().encode(Encoder(), audio, 81, 23.0, 0.8)
    assert isinstance(cond, FantasyTalkingConditioning) and cond.family == "fantasytalking"
    assert (cond.num_frames, cond.fps, cond.audio_scale, cond.latent_frames) == (81, 23.0, 0.8, 21)
    assert cond.features.shape == (1, int(81 / 23 * 16000) // 320, 768) and cond.features.dtype == torch.float32
    (_, wave, frames, fps), = speech
    assert (frames, fps) == (81, 23.0) and wave.shape == (80000,)          # the whole mono track goes in
    assert fitted["sample_rate"] == 16000 and fitted["waveform"].shape == (1, 2, int(81 / 23 * 16000) + 1)
    assert torch.equal(fitted["waveform"], audio["waveform"][:, :, :fitted["waveform"].shape[-1]])
    assert any("the rest of the audio is not used" in m for _, m in notices)


def test_short_audio_is_padded_with_silence_and_frames_are_rounded(speech, notices):
    cond, fitted = WanFantasyTalkingEmbeds().encode(Encoder(), tone(1.0), 47, 23.0, 1.0)
    assert cond.num_frames == 49 and round_frames(47) == 49 and round_frames(46) == 45 and round_frames(1) == 1
    assert fitted["waveform"].shape[-1] == int(49 / 23 * 16000) + 1
    assert fitted["waveform"][..., 16000:].abs().max() == 0                  # silence after the speech
    assert cond.features[0, 16000 // 320 + 1:].abs().max() == 0
    assert any("47 frames -> 49" in m for _, m in notices) and any("padded with silence" in m for _, m in notices)


def test_silent_audio_gives_finite_features(speech):
    audio = {"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}
    cond, _ = WanFantasyTalkingEmbeds().encode(Encoder(), audio, 9, 23.0, 1.0)
    assert torch.isfinite(cond.features).all()


def test_other_encoders_are_refused_or_noted(speech, notices):
    with pytest.raises(ValueError, match="1024 wide; FantasyTalking takes wav2vec2-base-960h"):
        WanFantasyTalkingEmbeds().encode(Encoder(config={"hidden_size": 1024}), tone(1.0), 9, 23.0, 1.0)
    WanFantasyTalkingEmbeds().encode(Encoder(name="chinese-wav2vec2-base", expects_normalized=False),
                                     tone(1.0), 9, 23.0, 1.0)
    assert any("not wav2vec2-base-960h" in m for _, m in notices)


@pytest.mark.parametrize("kwargs,words", [
    ({"speech_encoder": None}, "connect a speech encoder"),
    ({"audio": {"waveform": [0.0]}}, "ComfyUI AUDIO value"),
    ({"audio": {"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}}, "empty"),
    ({"audio": {"waveform": torch.zeros(1, 1, 10), "sample_rate": 0}}, "sample_rate"),
    ({"audio": {"waveform": torch.full((1, 1, 10), float("nan")), "sample_rate": 16000}}, "NaN"),
    ({"num_frames": 0}, "num_frames"),
    ({"frame_rate": float("nan")}, "frame_rate"),
    ({"frame_rate": 0.0}, "frame_rate must be positive"),
    ({"audio_scale": -1.0}, "audio_scale must be >= 0"),
])
def test_bad_inputs_are_explained_before_any_encoding(speech, kwargs, words):
    args = {"speech_encoder": Encoder(), "audio": tone(0.5), "num_frames": 9, "frame_rate": 23.0, "audio_scale": 1.0}
    args.update(kwargs)
    with pytest.raises(BadSettingError, match=words):
        WanFantasyTalkingEmbeds().encode(**args)
    assert speech == []
