"""From ComfyUI's AUDIO to what wav2vec2 hears: one mono 16 kHz float32 waveform.

AUDIO is {"waveform": [B, C, T] float, "sample_rate": int}. The first batch item is taken, its
channels averaged (as librosa's mono load the official scripts use does), and the result resampled
with a band-limited windowed-sinc filter (Kaiser window, as torchaudio's "sinc_interp_kaiser"), so
speech recorded at 44.1 / 48 kHz keeps everything up to ~7.5 kHz and gains no aliasing. Our own resampler
is always used, so results do not depend on whether torchaudio is installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..finite import BadSettingError
from .loudness import normalize_loudness

SPEECH_RATE = 16000
# The "kaiser_best" filter (resampy's, and torchaudio's recipe of that name): 64 zero crossings each side,
# cut-off at 94.76 % of the lower Nyquist frequency, Kaiser beta 14.77 — a narrow transition band, so
# speech up to ~7.5 kHz passes flat at 16 kHz and nothing above 8 kHz folds back. (torchaudio's default of
# 6 zero crossings leaves a transition band wide enough to pass a 10 kHz tone at -20 dB.)
LOWPASS_WIDTH = 64
ROLLOFF = 0.9475937167399596
KAISER_BETA = 14.769656459379492


class AudioInputError(BadSettingError):
    """An AUDIO value the speech encoder cannot use (wrong shape, no samples, not finite)."""


@lru_cache(maxsize=16)
def _sinc_kernels(orig: int, new: int, width_zc: int, rolloff: float, beta: float) -> tuple[torch.Tensor, int]:
    """([new, 1, K] float64 polyphase kernels, padding) for resampling by new/orig (already reduced)."""
    base = min(orig, new) * rolloff                   # cut-off, in cycles per `orig` samples' time unit
    pad = math.ceil(width_zc * orig / base)
    taps = torch.arange(-pad, pad + orig, dtype=torch.float64) / orig           # input offsets (time units)
    phase = -torch.arange(new, dtype=torch.float64)[:, None] / new               # output phases
    t = (phase + taps[None, :]) * base
    t = t.clamp(-width_zc, width_zc)
    window = torch.special.i0(beta * torch.sqrt(1 - (t / width_zc) ** 2)) / torch.special.i0(torch.tensor(beta, dtype=torch.float64))
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return (sinc * window * (base / orig))[:, None, :], pad


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling of [..., T] from `orig_rate` to `new_rate` Hz (float32; the filter designed in float64).

    Output length ceil(T · new / orig). The filter cuts at 94.8 % of the lower Nyquist frequency.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise AudioInputError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return wave.float()
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    kernels, pad = _sinc_kernels(orig, new, LOWPASS_WIDTH, ROLLOFF, KAISER_BETA)
    shape = wave.shape
    x = wave.reshape(-1, 1, shape[-1]).float()
    x = F.pad(x, (pad, pad + orig))
    # Polyphase form of conv1d(x, kernels, stride=orig): input sample k of a block is phase k % orig at
    # offset k // orig, so the strided one-channel convolution becomes an unstrided one over `orig`
    # channels (the same sums, a much faster kernel).
    taps = kernels.shape[-1]
    reach = -(-taps // orig)
    weight = F.pad(kernels[:, 0], (0, reach * orig - taps)).view(new, reach, orig).transpose(1, 2)
    blocks = (x.shape[-1] - taps) // orig + 1
    x = F.pad(x, (0, max(0, (blocks + reach - 1) * orig - x.shape[-1])))[..., : (blocks + reach - 1) * orig]
    x = x.view(x.shape[0], -1, orig).transpose(1, 2)              # [N, orig, blocks + reach - 1]
    y = F.conv1d(x, weight.float().contiguous().to(x.device))    # [N, new, blocks]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    length = math.ceil(new * shape[-1] / orig)
    return y[:, :length].reshape(*shape[:-1], length).float()


def prepare_waveform(audio: Mapping, *, sample_rate: int = SPEECH_RATE, loudness_lufs: float | None = None) -> torch.Tensor:
    """Core AUDIO -> mono float32 [T] at `sample_rate` (16 kHz for wav2vec2), first batch item.

    `loudness_lufs` (MultiTalk: -23) levels the clip to that integrated loudness (BS.1770-4, measured
    after resampling, as the official scripts do); silence stays silent.
    """
    if not isinstance(audio, Mapping) or "waveform" not in audio or "sample_rate" not in audio:
        raise AudioInputError("audio must be ComfyUI AUDIO: a dict with 'waveform' [batch, channels, samples] "
                              "and 'sample_rate'. Connect a Load Audio node (or another AUDIO output).")
    wave, rate = audio["waveform"], audio["sample_rate"]
    if not isinstance(wave, torch.Tensor):
        raise AudioInputError(f"audio['waveform'] must be a tensor, got {type(wave).__name__}.")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0 \
            or rate != int(rate):
        raise AudioInputError(f"audio['sample_rate'] must be a positive whole number of Hz, got {rate!r}.")
    if wave.dim() == 2:       # [channels, samples]: one clip without the batch axis
        wave = wave[None]
    if wave.dim() != 3:
        raise AudioInputError(f"audio['waveform'] must be [batch, channels, samples], got shape {tuple(wave.shape)}.")
    if wave.shape[0] == 0 or wave.shape[1] == 0 or wave.shape[2] == 0:
        raise AudioInputError(f"the audio is empty (waveform shape {tuple(wave.shape)}); give it some samples.")
    if not wave.is_floating_point():
        raise AudioInputError(f"audio['waveform'] must hold floating-point samples, got {wave.dtype}.")
    mono = wave[0].float().mean(dim=0)
    if not bool(torch.isfinite(mono).all()):
        raise AudioInputError("the audio holds NaN or infinite samples; re-export or re-decode the file.")
    out = resample(mono.cpu(), int(rate), int(sample_rate))
    if loudness_lufs is not None:
        out, _ = normalize_loudness(out, sample_rate, float(loudness_lufs))
    return out.float().contiguous()


def normalize_for_encoder(wave: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the clip, as the HF Wav2Vec2FeatureExtractor's do_normalize does
    ((x - mean) / sqrt(var + 1e-7), population variance)."""
    w = wave.double()
    mean = w.mean()
    var = ((w - mean) ** 2).mean()
    return ((w - mean) / torch.sqrt(var + 1e-7)).float()
