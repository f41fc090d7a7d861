"""MultiTalk and FantasyTalking speech features against the official recipes run on transformers'
Wav2Vec2Model and Wav2Vec2FeatureExtractor with the same tiny weights: the conv features interpolated to
25 fps before the transformer and every layer stacked (MultiTalk), the last hidden state of the audio
covering the video (FantasyTalking); audio shorter than the video padded with silence."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from slipstream.models.audio import fantasytalking_features, load_speech_encoder, multitalk_features
from slipstream.models.finite import BadSettingError

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from hf_wav2vec2 import hf_model, import_hf_wav2vec2  # noqa: E402
from speech_fixtures import TINY_BASE, tiny_wav2vec2_state_dict, write_tiny_wav2vec2  # noqa: E402

SR = 16000


def _max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def _speech(seconds: float, seed: int = 0) -> torch.Tensor:
    """Speech-like test audio: noise under a syllable-rate envelope plus a voiced tone."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t)
    return 0.1 * envelope * (torch.randn(t.shape[0], generator=g) + torch.sin(2 * math.pi * 180 * t))


def _pair(tmp_path, name: str, seed: int = 0):
    """(our SpeechEncoder, transformers model) on the same weights."""
    ours = load_speech_encoder(write_tiny_wav2vec2(tmp_path / f"{name}.safetensors", seed=seed))
    return ours, hf_model(tiny_wav2vec2_state_dict(seed=seed))


def _hf_input(wave, normalize: bool) -> torch.Tensor:
    _, _, extractor_cls = import_hf_wav2vec2()
    extractor = extractor_cls(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=normalize,
                              return_attention_mask=False)
    values = extractor(wave.numpy(), sampling_rate=SR).input_values
    return torch.as_tensor(values[0] if len(values) == 1 else values).float().reshape(1, -1)


class _Interpolated(torch.nn.Module):
    """MultiTalk's Wav2Vec2Model.forward: the conv features resized to seq_len (linear, align_corners)
    before the projection; the rest is the stock model."""

    def __init__(self, conv, seq_len: int):
        super().__init__()
        self.conv, self.seq_len = conv, seq_len

    def forward(self, x):
        return F.interpolate(self.conv(x), size=self.seq_len, mode="linear", align_corners=True)


def _official_multitalk(hf, speech: torch.Tensor, normalize: bool) -> torch.Tensor:
    """generate_multitalk.get_embedding: seq_len = int(seconds · 25); hidden_states[1:] -> [S, layers, dim]."""
    seq_len = int(len(speech) / SR * 25)
    conv = hf.feature_extractor
    hf.feature_extractor = _Interpolated(conv, seq_len)
    try:
        with torch.no_grad():
            out = hf(_hf_input(speech, normalize), output_hidden_states=True)
    finally:
        hf.feature_extractor = conv
    return torch.stack(out.hidden_states[1:], dim=1)[0].transpose(0, 1)


@pytest.mark.parametrize("normalize", [False, True])
def test_multitalk_matches_the_official_recipe(tmp_path, normalize):
    ours, hf = _pair(tmp_path, "chinese-wav2vec2-base" if not normalize else "wav2vec2-base-960h")
    assert ours.expects_normalized == normalize
    speech = _speech(2.0)
    feats = multitalk_features(ours, speech, num_frames=50)
    ref = _official_multitalk(hf, speech, normalize)
    assert feats.shape == (50, TINY_BASE.layers, TINY_BASE.hidden) == ref.shape
    assert feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert _max_rel(feats, ref) <= 1e-4


def test_multitalk_longer_audio_gives_the_first_frames_of_the_whole_clip(tmp_path):
    ours, hf = _pair(tmp_path, "chinese-wav2vec2-base", seed=1)
    speech = _speech(3.0, seed=1)
    ref = _official_multitalk(hf, speech, normalize=False)             # 75 frames for 3 s
    feats = multitalk_features(ours, speech, num_frames=33)
    assert feats.shape[0] == 33
    assert _max_rel(feats, ref[:33]) <= 1e-4


def test_multitalk_short_audio_is_padded_with_silence(tmp_path):
    ours, hf = _pair(tmp_path, "chinese-wav2vec2-base", seed=2)
    speech = _speech(1.0, seed=2)
    feats = multitalk_features(ours, speech, num_frames=81)             # 3.24 s of video for 1 s of speech
    padded = F.pad(speech, (0, math.ceil(81 / 25 * SR) - speech.shape[0]))
    ref = _official_multitalk(hf, padded, normalize=False)
    assert feats.shape == (81, TINY_BASE.layers, TINY_BASE.hidden) == ref.shape
    assert _max_rel(feats, ref) <= 1e-4


def test_multitalk_other_frame_rate(tmp_path):
    ours, _ = _pair(tmp_path, "chinese-wav2vec2-base")
    assert multitalk_features(ours, _speech(2.0), num_frames=40, fps=16.0).shape[0] == 40


def _official_fantasy(hf, speech: torch.Tensor, num_frames: int, fps: float) -> torch.Tensor:
    """utils.get_audio_features: samples [0, int(num_frames / fps · 16000)), the 960h processor
    (normalising), last_hidden_state."""
    segment = speech[: int(num_frames / fps * SR)]
    with torch.no_grad():
        return hf(_hf_input(segment, normalize=True)).last_hidden_state


def test_fantasytalking_matches_the_official_recipe(tmp_path):
    ours, hf = _pair(tmp_path, "wav2vec2-base-960h", seed=3)
    speech = _speech(4.0, seed=3)
    feats = fantasytalking_features(ours, speech, num_frames=81, fps=23)
    ref = _official_fantasy(hf, speech, 81, 23)
    assert feats.shape == ref.shape and feats.shape[0] == 1 and feats.shape[2] == TINY_BASE.hidden
    # the tiny conv stack makes 800 frames a second (the real one 50)
    assert feats.shape[1] == (int(81 / 23 * SR) - 30) // 20 + 1
    assert _max_rel(feats, ref) <= 1e-4


def test_fantasytalking_short_audio_is_padded_after_normalising(tmp_path):
    ours, hf = _pair(tmp_path, "wav2vec2-base-960h", seed=4)
    speech = _speech(1.0, seed=4)
    feats = fantasytalking_features(ours, speech, num_frames=49, fps=24)
    samples = int(49 / 24 * SR)
    normalized = _hf_input(speech, normalize=True)[0]
    with torch.no_grad():
        ref = hf(F.pad(normalized, (0, samples - normalized.shape[0]))[None]).last_hidden_state
    assert feats.shape == ref.shape
    assert _max_rel(feats, ref) <= 1e-4


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"num_frames": 0}, BadSettingError),
    ({"num_frames": 2.5}, BadSettingError),
    ({"num_frames": 10, "fps": 0.0}, BadSettingError),
    ({"num_frames": 10, "fps": float("nan")}, BadSettingError),
])
def test_bad_settings(tmp_path, kwargs, error):
    ours, _ = _pair(tmp_path, "w")
    kwargs.setdefault("fps", 25.0)
    with pytest.raises(error):
        multitalk_features(ours, _speech(0.5), **kwargs)
    with pytest.raises(error):
        fantasytalking_features(ours, _speech(0.5), **kwargs)


def test_waveform_must_be_mono(tmp_path):
    ours, _ = _pair(tmp_path, "w")
    with pytest.raises(ValueError, match="mono"):
        multitalk_features(ours, torch.zeros(2, 8000), num_frames=5)


def test_progress_reports_every_layer(tmp_path):
    ours, _ = _pair(tmp_path, "w")
    seen = []
    multitalk_features(ours, _speech(0.5), num_frames=12, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]
