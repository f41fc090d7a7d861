"""From speech (core AUDIO) to MultiTalkConditioning, the way the official MultiTalk scripts do it.

Each speaker's clip becomes mono 16 kHz, levelled to -23 LUFS (official `loudness_norm`), and is
encoded to per-frame wav2vec2 features (models/audio `multitalk_features`); the features get their
5-frame windows over the whole clip. Two speakers either talk at the same time ("para": both clips
from the start) or one after the other ("add": speaker 2's clip starts where speaker 1's ends, each
silent while the other talks), as the official `audio_type`. The audio to mux under the video is
what it shows: one speaker's own clip, or the 16 kHz sum of the two placed clips, cut to the video.

Silent audio is allowed: its features are those of silence, and that speaker keeps the mouth still
(useful for a listener); a note says so. Empty audio is an error (from prepare_waveform).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import torch

from .errors import WanInputError
from .multitalk_conditioning import AUDIO_WINDOW, MultiTalkConditioning, audio_windows

log = logging.getLogger("slipstream.wan")

SPEECH_RATE = 16000
MULTITALK_LUFS = -23.0          # official loudness_norm target
AUDIO_TYPES = ("para", "add")

Progress = Callable[[int, int], None]
FeatureFn = Callable[..., torch.Tensor]      # (encoder, waveform_16k, num_frames, fps, progress=) -> [T, L, C]


def _audio_api():
    """models/audio, imported when first needed (the speech encoder package)."""
    from .. import audio
    return audio


def place_speakers(first: torch.Tensor, second: torch.Tensor, audio_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two mono clips -> two clips of one length on the video's timeline ('para' or 'add')."""
    if audio_type not in AUDIO_TYPES:
        raise WanInputError(f"multi_audio_type must be one of {AUDIO_TYPES}, got '{audio_type}'.")
    if audio_type == "add":
        return (torch.cat([first, first.new_zeros(second.shape[0])]),
                torch.cat([second.new_zeros(first.shape[0]), second]))
    length = max(first.shape[0], second.shape[0])
    pad = torch.nn.functional.pad
    return pad(first, (0, length - first.shape[0])), pad(second, (0, length - second.shape[0]))


def _windowed(encoder, wave: torch.Tensor, num_frames: int, fps: float, features: FeatureFn,
              progress: Progress | None, speaker: int) -> torch.Tensor:
    if not bool(wave.abs().amax() > 0):
        log.info("Wan MultiTalk: the audio of speaker %d is silent; that speaker keeps the mouth still.", speaker)
    # two frames past the video's end, so the last frames' windows see their real right-hand neighbours
    rows = features(encoder, wave, num_frames + AUDIO_WINDOW // 2, fps, progress=progress)
    return audio_windows(rows, num_frames)


def multitalk_speech(encoder, audio_1: Mapping, audio_2: Mapping | None = None, *, num_frames: int,
                     frame_rate: float = 25.0, audio_scale: float = 1.0, normalize_loudness: bool = True,
                     audio_type: str = "para", regions: torch.Tensor | None = None,
                     features: FeatureFn | None = None, progress: Progress | None = None,
                     ) -> tuple[MultiTalkConditioning, dict]:
    """(conditioning, AUDIO to mux) for one or two speakers; two need `regions` [3, H, W]."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
        raise WanInputError(f"num_frames must be 4k + 1 (1, 5, …, 81, …), got {num_frames!r}.")
    if not math.isfinite(frame_rate) or frame_rate <= 0:
        raise WanInputError(f"frame_rate must be a positive number, got {frame_rate!r}.")
    if audio_2 is not None and regions is None:
        raise WanInputError("two speakers need their places in the picture: connect mask_1 and mask_2, or choose "
                         "the left / right or bounding-box placement.")
    api = _audio_api()
    features = features or api.multitalk_features
    lufs = MULTITALK_LUFS if normalize_loudness else None
    waves = [api.prepare_waveform(audio_1, loudness_lufs=lufs)]
    if audio_2 is not None:
        waves = list(place_speakers(waves[0], api.prepare_waveform(audio_2, loudness_lufs=lufs), audio_type))
    windows = torch.stack([_windowed(encoder, w, num_frames, frame_rate, features, _part(progress, i, len(waves)), i + 1)
                           for i, w in enumerate(waves)])
    conditioning = MultiTalkConditioning(windows, regions if audio_2 is not None else None, float(audio_scale))
    samples = math.ceil(num_frames / frame_rate * SPEECH_RATE - 1e-6)
    if audio_2 is None:
        mux = _cut(audio_1, num_frames / frame_rate)
    else:
        mix = (waves[0] + waves[1])[:samples]
        mux = {"waveform": mix[None, None].contiguous(), "sample_rate": SPEECH_RATE}
    return conditioning, mux


def _part(progress: Progress | None, index: int, parts: int) -> Progress | None:
    """Progress of one speaker's encoding as a share of all speakers'."""
    if progress is None:
        return None
    return lambda done, total: progress(index * total + done, parts * total)


def _cut(audio: Mapping, seconds: float) -> dict:
    """The speaker's own clip (all channels, its own rate) cut to the video's duration."""
    rate = int(audio["sample_rate"])
    wave = audio["waveform"]
    wave = wave[None] if wave.dim() == 2 else wave
    return {"waveform": wave[:, :, :math.ceil(seconds * rate - 1e-6)].contiguous(), "sample_rate": rate}
