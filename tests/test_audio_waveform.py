"""ComfyUI AUDIO to mono 16 kHz: the windowed-sinc resampler keeps a tone's frequency and amplitude (checked
against the analytic sine at the new rate), removes what the new rate cannot hold, mixes channels to mono,
and refuses AUDIO values it cannot use with a message."""

from __future__ import annotations

import math

import pytest
import torch
from slipstream.models.audio import AudioInputError, normalize_for_encoder, prepare_waveform, resample


def _sine(freq: float, rate: int, seconds: float, amp: float = 1.0, phase: float = 0.0) -> torch.Tensor:
    t = torch.arange(int(round(rate * seconds)), dtype=torch.float64) / rate
    return amp * torch.sin(2 * math.pi * freq * t + phase)


def _fit(wave: torch.Tensor, freq: float, rate: int) -> tuple[float, float]:
    """(amplitude, residual rms) of a least-squares sine at `freq` through the wave's middle."""
    w = wave.double()
    t = torch.arange(w.shape[0], dtype=torch.float64) / rate
    basis = torch.stack([torch.sin(2 * math.pi * freq * t), torch.cos(2 * math.pi * freq * t)], 1)
    coef = torch.linalg.lstsq(basis, w[:, None]).solution[:, 0]
    residual = w - basis @ coef
    return float(coef.norm()), float(residual.pow(2).mean().sqrt())


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("freq", [440.0, 3000.0])
def test_tone_keeps_frequency_and_amplitude(rate, freq):
    if freq >= rate / 2 * 0.9:
        pytest.skip("tone above what the source rate holds")
    out = resample(_sine(freq, rate, 1.0, amp=0.8, phase=0.3).float(), rate, 16000)
    assert out.dtype == torch.float32 and out.shape == (math.ceil(rate * 1.0 * 16000 / rate),)
    expected = _sine(freq, 16000, 1.0, amp=0.8, phase=0.3)
    middle = slice(800, 16000 - 800)                 # away from the clip's edges, where the filter sees zeros
    assert (out[middle].double() - expected[middle]).abs().max() < 2e-3
    amp, residual = _fit(out[middle], freq, 16000)
    assert abs(amp - 0.8) < 1e-3 and residual < 1e-3


def test_frequencies_above_the_new_nyquist_are_removed():
    out = resample(_sine(10000.0, 48000, 1.0).float(), 48000, 16000)      # 10 kHz cannot exist at 16 kHz
    assert out[800:-800].pow(2).mean().sqrt() < 1e-3                     # < -57 dB of the tone's rms


def test_length_and_identity():
    x = torch.randn(2, 4410)
    assert resample(x, 44100, 16000).shape == (2, 1600)
    assert resample(torch.randn(1001), 48000, 16000).shape == (334,)
    assert torch.equal(resample(x, 16000, 16000), x)


def test_stereo_is_mixed_to_mono_and_first_item_taken():
    left = _sine(440.0, 16000, 0.5).float()
    batch = torch.stack([torch.stack([left, 0.5 * left]), torch.zeros(2, 8000)])     # [2, 2, T]
    out = prepare_waveform({"waveform": batch, "sample_rate": 16000})
    assert out.shape == (8000,) and out.dtype == torch.float32
    assert torch.allclose(out, 0.75 * left, atol=1e-7)
    # [channels, samples] without the batch axis is taken as one clip
    assert torch.allclose(prepare_waveform({"waveform": batch[0], "sample_rate": 16000}), out)


def test_prepare_resamples_44k1_stereo():
    wave = _sine(1000.0, 44100, 1.0, amp=0.5).float()
    out = prepare_waveform({"waveform": torch.stack([wave, wave])[None], "sample_rate": 44100})
    amp, residual = _fit(out[800:-800], 1000.0, 16000)
    assert out.shape == (16000,) and abs(amp - 0.5) < 1e-3 and residual < 1e-3


@pytest.mark.parametrize(("audio", "message"), [
    ("clip.wav", "ComfyUI AUDIO"),
    ({"waveform": torch.zeros(1, 1, 10)}, "ComfyUI AUDIO"),
    ({"waveform": [0.0, 1.0], "sample_rate": 16000}, "must be a tensor"),
    ({"waveform": torch.zeros(1, 1, 100), "sample_rate": 0}, "positive whole number"),
    ({"waveform": torch.zeros(1, 1, 100), "sample_rate": 44100.5}, "positive whole number"),
    ({"waveform": torch.zeros(1, 1, 100), "sample_rate": True}, "positive whole number"),
    ({"waveform": torch.zeros(100), "sample_rate": 16000}, "batch, channels, samples"),
    ({"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}, "empty"),
    ({"waveform": torch.zeros(1, 1, 100, dtype=torch.int16), "sample_rate": 16000}, "floating-point"),
    ({"waveform": torch.full((1, 1, 100), float("nan")), "sample_rate": 16000}, "NaN"),
])
def test_bad_audio_is_refused_with_a_reason(audio, message):
    with pytest.raises(AudioInputError, match=message):
        prepare_waveform(audio)


def test_encoder_normalisation_is_the_feature_extractor_formula():
    x = torch.randn(5000) * 3 + 1
    out = normalize_for_encoder(x)
    x64 = x.double()
    want = (x64 - x64.mean()) / torch.sqrt(x64.var(unbiased=False) + 1e-7)
    assert torch.allclose(out.double(), want, atol=1e-6)
    assert torch.equal(normalize_for_encoder(torch.zeros(10)), torch.zeros(10))
