"""Core AUDIO -> FantasyTalking conditioning, and the AUDIO to mux, both fitted to the video's length.

    cond, fitted, notes = fantasytalking_embeds(encoder, audio, num_frames=81, fps=23.0, audio_scale=1.0)

The official inference cuts the audio at int(num_frames / fps · 16000) samples and encodes that
with wav2vec2-base-960h (last hidden state). It chooses num_frames from the audio's length, so its
audio always covers the video. Here num_frames is the user's: audio shorter than the video is
padded with silence (after the encoder's normalisation, by the speech-encoder package's
`fantasytalking_features`), so the tokens keep their rate (about 50 per second) and the windows
(L / num_frames tokens per frame) stay on the audio's real timing instead of stretching a short
clip over the whole video. Longer audio is cut. The AUDIO returned is the input track (all its
channels, its own sample rate) cut or padded the same way.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import torch

from .fantasytalking import AUDIO_IN_DIM, FantasyTalkingConditioning

SPEECH_RATE = 16000            # wav2vec2's sample rate


def fit_samples(waveform: torch.Tensor, samples: int) -> torch.Tensor:
    """[..., T] cut or zero-padded (silence) at the end to exactly `samples`."""
    have = waveform.shape[-1]
    if have >= samples:
        return waveform[..., :samples]
    pad = waveform.new_zeros(*waveform.shape[:-1], samples - have)
    return torch.cat([waveform, pad], dim=-1)


def video_seconds(num_frames: int, fps: float) -> float:
    """The stretch of audio the official code encodes for a video: num_frames / fps seconds."""
    return num_frames / fps


def fit_audio(audio: Mapping, seconds: float) -> dict:
    """Core AUDIO (first batch item, every channel) cut or padded with silence to `seconds`."""
    waveform, rate = audio["waveform"], int(audio["sample_rate"])
    if waveform.dim() == 2:
        waveform = waveform.unsqueeze(0)
    return {"waveform": fit_samples(waveform[:1], math.ceil(seconds * rate)), "sample_rate": rate}


def fantasytalking_embeds(encoder, audio: Mapping, num_frames: int, fps: float, audio_scale: float,
                          progress: Callable[[int, int], None] | None = None,
                          ) -> tuple[FantasyTalkingConditioning, dict, list[str]]:
    """(conditioning, AUDIO fitted to the video, notes for the user); see the module docstring."""
    from ..audio import fantasytalking_features, prepare_waveform  # the speech-encoder package

    width = _width(encoder) if getattr(encoder, "config", None) is not None else None
    if width is not None and width >= AUDIO_IN_DIM and width != AUDIO_IN_DIM:    # narrower: test encoders
        raise ValueError(f"the speech encoder '{getattr(encoder, 'name', '?')}' is {width} wide; "
                         f"FantasyTalking takes wav2vec2-base-960h features ({AUDIO_IN_DIM} wide). Load "
                         "wav2vec2-base-960h in the speech encoder loader.")
    notes = []
    if getattr(encoder, "expects_normalized", True) is False:
        notes.append(f"the speech encoder '{getattr(encoder, 'name', '?')}' is not wav2vec2-base-960h (it takes "
                     "unnormalised audio, as chinese-wav2vec2-base does); FantasyTalking was trained on "
                     "wav2vec2-base-960h features, so lip sync may suffer.")
    seconds = video_seconds(num_frames, fps)
    waveform = prepare_waveform(audio, sample_rate=SPEECH_RATE)
    wanted = int(seconds * SPEECH_RATE)
    if waveform.shape[-1] < wanted:
        notes.append(f"the audio is {waveform.shape[-1] / SPEECH_RATE:.2f} s, the video {seconds:.2f} s "
                     f"({num_frames} frames at {fps:g} fps): padded with silence.")
    elif waveform.shape[-1] > wanted:
        notes.append(f"the audio is {waveform.shape[-1] / SPEECH_RATE:.2f} s, the video {seconds:.2f} s: "
                     "the rest of the audio is not used.")
    extra = {"progress": progress} if progress is not None and \
        "progress" in inspect.signature(fantasytalking_features).parameters else {}
    features = fantasytalking_features(encoder, waveform, num_frames, fps, **extra)
    features = features.detach().float().cpu()
    if features.dim() == 2:
        features = features.unsqueeze(0)
    cond = FantasyTalkingConditioning(features, num_frames=num_frames, fps=fps, audio_scale=audio_scale)
    return cond, fit_audio(audio, seconds), notes


def _width(encoder) -> int | None:
    config = encoder.config
    width = config.get("hidden_size") if isinstance(config, Mapping) else getattr(config, "hidden_size", None)
    return int(width) if isinstance(width, int) else None
