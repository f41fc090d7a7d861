"""Wan FantasyTalking Audio Embeds: speech -> the audio conditioning FantasyTalking's Wan sampler run takes.

The heavy lifting is in models/wan/fantasytalking_embeds.py (fitting the audio to the video, the
wav2vec2 features); this node checks its inputs, reports what it changed and returns the
conditioning plus the audio track cut or padded to the video for muxing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..host import ProgressBar, notice
from ..models.finite import BadSettingError, finite_number
from ..models.wan.fantasytalking import DEFAULT_FPS
from ..models.wan.fantasytalking_embeds import fantasytalking_embeds
from .wan import CATEGORY

NODE = "Wan FantasyTalking Audio Embeds"


def _check_audio(audio: object) -> None:
    """Refuse a value that is not core AUDIO before any model work, naming what it should be."""
    if not isinstance(audio, Mapping) or not isinstance(audio.get("waveform"), torch.Tensor):
        raise BadSettingError(f"{NODE}: 'audio' must be a ComfyUI AUDIO value (a dict with 'waveform' [batch, "
                              "channels, samples] and 'sample_rate'); connect Load Audio.")
    waveform, rate = audio["waveform"], audio.get("sample_rate")
    if waveform.dim() not in (2, 3) or waveform.shape[-1] == 0 or waveform.shape[-2] == 0:
        raise BadSettingError(f"{NODE}: the audio waveform has shape {tuple(waveform.shape)}; expected [batch, "
                              "channels, samples] with some samples. The audio file is empty.")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0 \
            or rate != int(rate):
        raise BadSettingError(f"{NODE}: the audio's sample_rate must be a positive whole number, got {rate!r}.")
    if not waveform.is_floating_point() or not bool(torch.isfinite(waveform).all()):
        raise BadSettingError(f"{NODE}: the audio holds NaN/infinite or non-float samples; the audio file or the "
                              "node that made it went wrong.")


def round_frames(num_frames: int) -> int:
    """1 + 4k frames, the nearest (halves up), as the official pipeline rounds: (n + 2) // 4 · 4 + 1."""
    return 1 + 4 * max(0, math.floor((num_frames - 1) / 4 + 0.5))


class WanFantasyTalkingEmbeds:
    DESCRIPTION = ("Encodes speech for FantasyTalking (a speech model for Wan 2.1 I2V 14B 720P): the wav2vec2-base-"
                   "960h features of the audio covering the video (num_frames / frame_rate seconds; shorter audio "
                   "is padded with silence, longer audio cut). Feed the embeds to the Wan sampler's audio input and "
                   "the audio output to Video Combine. Silent audio is valid: it drives a closed mouth.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("SLIPSTREAM_WAN_AUDIO", "AUDIO")
    RETURN_NAMES = ("audio_embeds", "audio")
    OUTPUT_TOOLTIPS = ("FantasyTalking audio conditioning for the Wan sampler (with the FantasyTalking speech model).",
                       "The input audio cut or padded with silence to the video's length, to mux into the video.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "speech_encoder": ("SLIPSTREAM_SPEECH_ENCODER", {
                "tooltip": "From Load Speech Encoder (wav2vec2): wav2vec2-base-960h, the encoder FantasyTalking was "
                           "trained with."}),
            "audio": ("AUDIO", {"tooltip": "The speech, e.g. from Load Audio (any sample rate; mixed to mono, "
                                           "resampled to 16 kHz for the encoder)."}),
            "num_frames": ("INT", {"default": 81, "min": 1, "max": 10001, "step": 4,
                                   "tooltip": "Video frames to make: 1+4k, the same as the sampler's (others are "
                                              "rounded to the nearest 1+4k)."}),
            "frame_rate": ("FLOAT", {"default": DEFAULT_FPS, "min": 1.0, "max": 120.0, "step": 0.01,
                                     "tooltip": "Video frame rate; FantasyTalking is trained at 23 fps. Set Video "
                                                "Combine to the same rate so the lips stay in sync."}),
            "audio_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                      "tooltip": "Strength of the audio in every block (official default 1.0; 0 "
                                                 "turns the audio off)."}),
        }}

    def encode(self, speech_encoder, audio, num_frames, frame_rate, audio_scale) -> tuple:
        if speech_encoder is None:
            raise BadSettingError(f"{NODE}: connect a speech encoder (Load Speech Encoder, wav2vec2-base-960h).")
        _check_audio(audio)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise BadSettingError(f"{NODE}: num_frames must be a whole number >= 1 (1+4k: 1, 5, … 81), got "
                                  f"{num_frames!r}.")
        fps = finite_number("frame_rate", frame_rate, NODE)
        scale = finite_number("audio_scale", audio_scale, NODE)
        if fps <= 0:
            raise BadSettingError(f"{NODE}: frame_rate must be positive, got {fps}.")
        if scale < 0:
            raise BadSettingError(f"{NODE}: audio_scale must be >= 0 (0 = no audio), got {scale}.")
        frames = round_frames(num_frames)
        notes = [] if frames == num_frames else [f"{num_frames} frames -> {frames} (Wan makes 1+4k frames)"]
        bar = ProgressBar(1)
        try:
            bar.update_absolute(0)
            cond, fitted, more = fantasytalking_embeds(speech_encoder, audio, frames, fps, scale,
                                                       progress=lambda done, total: bar.update_absolute(done, total))
            bar.update_absolute(1, 1)
        finally:
            close = getattr(bar, "close", None)
            if close is not None:
                close()
        for note in notes + more:
            notice(NODE, note)
        return (cond, fitted)
