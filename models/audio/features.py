"""Speech features the talking-head families condition on, computed the way each official pipeline does.

MultiTalk / InfiniteTalk (`multitalk_features`): the clip's conv features are linearly interpolated
(align_corners) to one vector per video frame at 25 fps *before* the transformer, and the outputs of
all transformer layers are kept: [frames, 12, 768]. The official scripts encode the whole clip with
seq_len = int(seconds · 25) and later read the frames they need; here the whole clip is encoded the
same way and the first `num_frames` rows are returned, so the features of a frame do not depend on
how long the video is. InfiniteTalk's audio path is the same (same encoder, same interpolation,
same -23 LUFS levelling); it only reads longer runs of frames for its streaming clips.

FantasyTalking (`fantasytalking_features`): the audio covering the video, samples
[0, int(num_frames / fps · 16000)), is normalised (the 960h processor does) and encoded at the
encoder's own 50 frames per second; the last hidden state is kept: [1, L, 768].

Audio shorter than the video is padded with silence to the video's duration (the official scripts
would produce fewer frames than the video has, which no sampler can use); the padding is added after
the input normalisation so the speech itself is encoded as the official pipeline encodes it.
Memory: the conv stack runs through long clips 30 s at a time (Wav2Vec2.extract_features: the same
frames), about 200 MB of fp32 activations whatever the length; the transformer then sees 25 tokens a
second (MultiTalk) or 50 (FantasyTalking) — a 10-minute MultiTalk clip is 15 000 tokens, which the
memory-efficient attention kernels handle without the L² score matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..finite import BadSettingError
from .encoder import SpeechEncoder
from .waveform import SPEECH_RATE, AudioInputError, normalize_for_encoder

Progress = Callable[[int, int], None]


@contextmanager
def _running(encoder: SpeechEncoder) -> Iterator[SpeechEncoder]:
    """The encoder on its compute device for the call; back where it was afterwards when it offloads."""
    target = getattr(encoder, "compute_device", None)
    home = encoder.device
    if target is None or torch.device(target) == home:
        yield encoder
        return
    encoder.to(target)
    try:
        yield encoder
    finally:
        if getattr(encoder, "offload", True):
            encoder.to(home)


def _check(waveform: torch.Tensor, num_frames: int, fps: float) -> torch.Tensor:
    if not isinstance(waveform, torch.Tensor) or waveform.dim() != 1:
        shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise AudioInputError(f"the speech waveform must be mono 16 kHz samples [T] (prepare_waveform gives that), got {shape}.")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise BadSettingError(f"num_frames must be a whole number of at least 1, got {num_frames!r}.")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise BadSettingError(f"fps must be a positive frame rate, got {fps!r}.")
    if not bool(torch.isfinite(waveform).all()):
        raise AudioInputError("the speech waveform holds NaN or infinite samples.")
    return waveform.float()


def _video_samples(num_frames: int, fps: float) -> int:
    """16 kHz samples covering `num_frames` video frames (rounded up, so no frame lacks audio)."""
    return math.ceil(num_frames / fps * SPEECH_RATE - 1e-6)


def _input(encoder: SpeechEncoder, wave: torch.Tensor, samples: int) -> torch.Tensor:
    """Normalised if the encoder expects it, then padded with silence to at least `samples`."""
    if encoder.expects_normalized:
        wave = normalize_for_encoder(wave)
    if wave.shape[0] < samples:
        wave = F.pad(wave, (0, samples - wave.shape[0]))
    return wave


def interpolate_frames(features: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L, C] -> [B, length, C], linear with align_corners (MultiTalk's linear_interpolation)."""
    return F.interpolate(features.transpose(1, 2), size=length, mode="linear", align_corners=True).transpose(1, 2)


@torch.no_grad()
def multitalk_features(encoder: SpeechEncoder, waveform_16k: torch.Tensor, num_frames: int, fps: float = 25.0,
                       *, progress: Progress | None = None) -> torch.Tensor:
    """[num_frames, num_layers, dim] float32 (CPU): MultiTalk's per-frame features of every layer.

    `waveform_16k`: mono [T] at 16 kHz (prepare_waveform; MultiTalk levels it to -23 LUFS first).
    `progress(done, total)` after every transformer layer.
    """
    wave = _check(waveform_16k, num_frames, fps)
    wave = _input(encoder, wave, _video_samples(num_frames, fps))
    seq_len = max(num_frames, int(wave.shape[0] / SPEECH_RATE * fps))
    with _running(encoder) as enc:
        feats = interpolate_frames(enc.extract_features(wave[None]), seq_len)
        states = enc.encode_features(feats, callback=progress)
    stacked = torch.stack(states[1:], dim=2)[0]        # [seq_len, layers, dim]
    return stacked[:num_frames].float().cpu().contiguous()


@torch.no_grad()
def fantasytalking_features(encoder: SpeechEncoder, waveform_16k: torch.Tensor, num_frames: int, fps: float,
                            *, progress: Progress | None = None) -> torch.Tensor:
    """[1, L, dim] float32 (CPU): the last hidden state of the audio covering the video's duration, L =
    the encoder's frames (50 per second) of int(num_frames / fps · 16000) samples."""
    wave = _check(waveform_16k, num_frames, fps)
    samples = int(num_frames / fps * SPEECH_RATE)
    wave = _input(encoder, wave[:samples], samples)
    with _running(encoder) as enc:
        states = enc(wave[None], callback=progress)
    return states[-1].float().cpu().contiguous()
