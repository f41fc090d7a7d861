"""ComfyUI AUDIO ({"waveform": [B,C,T], "sample_rate": int}) to a raw file ffmpeg muxes beside the video.

The track is cut or padded with silence to exactly the video's length here, so the result does
not depend on ffmpeg's `-shortest`/`apad` behaviour (which differs between builds: old ones lack
`apad=whole_dur`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_CHUNK_SAMPLES = 1 << 16


class AudioError(ValueError):
    """The AUDIO value cannot be muxed; the message says why."""


@dataclass(frozen=True)
class RawAudio:
    """A written f32le file and how ffmpeg should read it."""

    path: str
    sample_rate: int
    channels: int
    samples: int
    notes: tuple[str, ...] = ()


def _waveform_and_rate(audio: Mapping[str, Any]) -> tuple[torch.Tensor, int, list[str]]:
    if not isinstance(audio, Mapping) or "waveform" not in audio:
        raise AudioError("audio must be a ComfyUI AUDIO value: a dict with 'waveform' [batch, channels, samples] "
                         "and 'sample_rate'.")
    waveform = audio["waveform"]
    rate = audio.get("sample_rate", audio.get("sampler_rate"))
    if not isinstance(waveform, torch.Tensor):
        raise AudioError(f"audio['waveform'] must be a tensor, got {type(waveform).__name__}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0 or int(rate) != rate:
        raise AudioError(f"audio['sample_rate'] must be a positive whole number of samples per second, got {rate!r}")
    notes: list[str] = []
    if waveform.ndim == 2:
        waveform = waveform.unsqueeze(0)
    if waveform.ndim != 3 or waveform.shape[1] == 0:
        raise AudioError(f"audio['waveform'] has shape {tuple(waveform.shape)}; expected [batch, channels, samples].")
    if waveform.shape[0] > 1:
        notes.append(f"audio has a batch of {waveform.shape[0]} clips; the first is muxed")
    return waveform[0], int(rate), notes


def audio_length(audio: Mapping[str, Any]) -> tuple[int, int]:
    """(samples, sample_rate) of the clip that would be muxed (the first of a batch)."""
    waveform, rate, _ = _waveform_and_rate(audio)
    return int(waveform.shape[1]), rate


def write_raw_audio(audio: Mapping[str, Any], duration_s: float, path: str) -> RawAudio:
    """Write the first clip of `audio` as interleaved float32, cut or padded to `duration_s` seconds."""
    waveform, rate, notes = _waveform_and_rate(audio)
    channels, available = int(waveform.shape[0]), int(waveform.shape[1])
    wanted = max(1, math.ceil(duration_s * rate))
    if available == 0:
        notes.append("audio is empty; the video gets a silent track")
    elif available < wanted:
        notes.append(f"audio is {available / rate:.2f} s, the video {duration_s:.2f} s: padded with silence")
    elif available > wanted:
        notes.append(f"audio is {available / rate:.2f} s, the video {duration_s:.2f} s: cut to the video's length")
    with open(path, "wb") as f:
        for start in range(0, min(available, wanted), _CHUNK_SAMPLES):
            stop = min(start + _CHUNK_SAMPLES, available, wanted)
            chunk = waveform[:, start:stop].to(device="cpu", dtype=torch.float32)
            if not torch.isfinite(chunk).all():
                raise AudioError(f"audio contains NaN or infinite samples (near {start / rate:.2f} s); "
                                 "nothing was written.")
            f.write(np.ascontiguousarray(chunk.T.numpy()).tobytes())
        silence = wanted - min(available, wanted)
        zeros = np.zeros((min(silence, _CHUNK_SAMPLES), channels), dtype=np.float32)
        while silence > 0:
            n = min(silence, _CHUNK_SAMPLES)
            f.write(zeros[:n].tobytes())
            silence -= n
    return RawAudio(path, rate, channels, wanted, tuple(notes))
