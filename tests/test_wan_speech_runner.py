"""The headless runner's stand-in for core Load Audio (the speech demos feed their embeds nodes with it)."""

from __future__ import annotations

import wave

import pytest
import torch
from slipstream.runner.core_nodes import CORE_STAND_INS, read_wav


def _write(path, samples: torch.Tensor, width: int, rate: int = 16000):
    channels = samples.shape[0]
    scale = {1: 127, 2: 32767, 4: 2 ** 31 - 1}[width]
    ints = (samples.t().reshape(-1) * scale).round().long()
    if width == 1:
        data = (ints + 128).to(torch.uint8).numpy().tobytes()
    else:
        data = ints.to({2: torch.int16, 4: torch.int32}[width]).numpy().tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(data)


@pytest.mark.parametrize("width,tol", [(1, 1 / 100), (2, 1e-4), (4, 1e-8)])
def test_pcm_wav_reads_as_core_audio(tmp_path, width, tol):
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(2, 500, generator=g) * 1.6 - 0.8          # stereo: channel order must survive
    _write(tmp_path / "a.wav", samples, width, rate=22050)
    audio = read_wav(str(tmp_path / "a.wav"))
    assert audio["sample_rate"] == 22050 and audio["waveform"].shape == (1, 2, 500)
    assert audio["waveform"].dtype == torch.float32
    assert (audio["waveform"][0] - samples).abs().max() < tol


def test_the_stand_in_has_core_ids_and_lists_the_input_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIPSTREAM_INPUT", str(tmp_path))
    _write(tmp_path / "voice.wav", torch.zeros(1, 100), 2)
    (tmp_path / "notes.txt").write_text("x")
    node = CORE_STAND_INS["LoadAudio"]
    assert node.RETURN_TYPES == ("AUDIO",) and node.INPUT_TYPES()["required"]["audio"][0] == ["voice.wav"]
    (audio,) = node().load("voice.wav")
    assert audio["waveform"].shape == (1, 1, 100)


def test_a_file_that_is_no_pcm_wav_says_what_to_do(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"ID3 not a wav at all")
    with pytest.raises(ValueError, match="not a PCM WAV.*16-bit PCM WAV"):
        read_wav(str(tmp_path / "x.wav"))
