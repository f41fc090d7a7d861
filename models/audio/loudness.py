"""Integrated loudness (ITU-R BS.1770-4, LUFS) and loudness normalisation, in torch (float64).

MultiTalk levels every speech clip to -23 LUFS before encoding (with pyloudnorm); this is the same
measurement, so a clip gets the same gain:

1. K-weighting: a high shelf (+4 dB above ~1.5 kHz, Q 1/√2) and a high pass (38 Hz, Q 0.5), the two
   biquads designed for the clip's own sample rate with the RBJ cookbook formulas (pyloudnorm's
   "K-weighting" design, which matches the BS.1770 48 kHz coefficients at 48 kHz);
2. mean square of 400 ms blocks overlapping by 75 %, loudness of a block -0.691 + 10·log10(z);
3. blocks under -70 LUFS are dropped (absolute gate), then blocks more than 10 LU under the loudness of
   the rest (relative gate); the loudness of the mean square of what remains is the result.

Silence (or a clip shorter than one 400 ms block) has no loudness: -inf, and `normalize_loudness`
leaves it as it is rather than dividing by zero (MultiTalk does the same for anything beyond ±100).
"""

from __future__ import annotations

import math

import torch

BLOCK_S = 0.400
OVERLAP = 0.75
ABSOLUTE_GATE = -70.0
RELATIVE_GATE = -10.0
_SCAN_BLOCK = 256


def _biquad_design(kind: str, gain_db: float, q: float, fc: float, rate: float) -> tuple[list[float], list[float]]:
    """(b, a) normalised so a[0] = 1, RBJ cookbook formulas."""
    a_ = 10 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * fc / rate
    cw, alpha = math.cos(w0), math.sin(w0) / (2.0 * q)
    if kind == "high_shelf":
        sa = 2 * math.sqrt(a_) * alpha
        b = [a_ * ((a_ + 1) + (a_ - 1) * cw + sa), -2 * a_ * ((a_ - 1) + (a_ + 1) * cw), a_ * ((a_ + 1) + (a_ - 1) * cw - sa)]
        a = [(a_ + 1) - (a_ - 1) * cw + sa, 2 * ((a_ - 1) - (a_ + 1) * cw), (a_ + 1) - (a_ - 1) * cw - sa]
    elif kind == "high_pass":
        b = [(1 + cw) / 2, -(1 + cw), (1 + cw) / 2]
        a = [1 + alpha, -2 * cw, 1 - alpha]
    else:
        raise ValueError(f"unknown biquad kind {kind!r}")
    return [x / a[0] for x in b], [x / a[0] for x in a]


def k_weighting(rate: float) -> list[tuple[list[float], list[float]]]:
    """The two K-weighting stages (b, a) for a sample rate."""
    return [_biquad_design("high_shelf", 4.0, 1 / math.sqrt(2), 1500.0, rate),
            _biquad_design("high_pass", 0.0, 0.5, 38.0, rate)]


def biquad(x: torch.Tensor, b: list[float], a: list[float]) -> torch.Tensor:
    """y[n] = b0 x[n] + b1 x[n-1] + b2 x[n-2] - a1 y[n-1] - a2 y[n-2] (zero initial state), [T] float64.

    Exact, without a Python loop over samples: the FIR part is a convolution; the recursion runs in
    blocks of 256 — each block's zero-state response is a matmul with the truncated impulse response,
    and only the two carried outputs between blocks are chained one block after the other.
    """
    x = x.double()
    n = x.shape[0]
    padded = torch.cat([x.new_zeros(2), x])
    v = b[0] * padded[2:] + b[1] * padded[1:-1] + b[2] * padded[:-2]
    a1, a2 = a[1], a[2]
    size = _SCAN_BLOCK
    blocks = -(-n // size)
    v = torch.cat([v, v.new_zeros(blocks * size - n)]).view(blocks, size)
    # h: impulse response; c1/c2: free response to y[-1] = 1 and to y[-2] = 1 (length `size`).
    h, c1, c2 = ([0.0] * size for _ in range(3))
    for i in range(size):
        h[i] = (1.0 if i == 0 else 0.0) - a1 * (h[i - 1] if i >= 1 else 0.0) - a2 * (h[i - 2] if i >= 2 else 0.0)
        c1[i] = -a1 * (c1[i - 1] if i >= 1 else 1.0) - a2 * (c1[i - 2] if i >= 2 else (1.0 if i == 1 else 0.0))
        c2[i] = -a1 * (c2[i - 1] if i >= 1 else 0.0) - a2 * (c2[i - 2] if i >= 2 else (1.0 if i == 0 else 0.0))
    ht = torch.tensor(h, dtype=torch.float64, device=x.device)
    idx = torch.arange(size, device=x.device)
    lag = idx[:, None] - idx[None, :]
    toeplitz = torch.where(lag >= 0, ht[lag.clamp_min(0)], ht.new_zeros(()))   # [n_out, n_in]
    zero_state = v @ toeplitz.T
    cc1, cc2 = (torch.tensor(c, dtype=torch.float64, device=x.device) for c in (c1, c2))
    ends = zero_state[:, -2:].tolist()
    e1, e2 = (c1[-1], c1[-2]), (c2[-1], c2[-2])
    s1, s2 = [0.0] * blocks, [0.0] * blocks     # y[-1], y[-2] entering each block
    for j in range(1, blocks):
        p1, p2 = s1[j - 1], s2[j - 1]
        s1[j] = ends[j - 1][1] + e1[0] * p1 + e2[0] * p2
        s2[j] = ends[j - 1][0] + e1[1] * p1 + e2[1] * p2
    y = zero_state + torch.tensor(s1, dtype=torch.float64, device=x.device)[:, None] * cc1 \
        + torch.tensor(s2, dtype=torch.float64, device=x.device)[:, None] * cc2
    return y.reshape(-1)[:n]


def integrated_loudness(wave: torch.Tensor, rate: float) -> float:
    """Integrated loudness in LUFS of a mono waveform [T] (full scale = 1.0); -inf for silence or a clip
    shorter than one 400 ms block."""
    if wave.dim() != 1:
        raise ValueError(f"integrated_loudness expects a mono waveform [T], got shape {tuple(wave.shape)}")
    if rate <= 0:
        raise ValueError(f"sample rate must be positive, got {rate}")
    block = BLOCK_S * rate
    if wave.shape[0] < block:
        return float("-inf")
    y = wave.double()
    for b, a in k_weighting(rate):
        y = biquad(y, b, a)
    length_s = wave.shape[0] / rate
    step = 1.0 - OVERLAP
    count = int(round((length_s - BLOCK_S) / (BLOCK_S * step))) + 1
    sums = torch.cat([y.new_zeros(1), torch.cumsum(y * y, 0)])
    lo = torch.tensor([int(BLOCK_S * (j * step) * rate) for j in range(count)])
    hi = torch.tensor([min(int(BLOCK_S * (j * step + 1) * rate), wave.shape[0]) for j in range(count)])
    z = (sums[hi] - sums[lo]) / block
    with torch.no_grad():
        blocks = -0.691 + 10.0 * torch.log10(z)
    kept = blocks >= ABSOLUTE_GATE
    if not bool(kept.any()):
        return float("-inf")
    relative = -0.691 + 10.0 * math.log10(float(z[kept].mean())) + RELATIVE_GATE
    kept = kept & (blocks > relative)
    if not bool(kept.any()):
        return float("-inf")
    return -0.691 + 10.0 * math.log10(float(z[kept].mean()))


def normalize_loudness(wave: torch.Tensor, rate: float, target_lufs: float) -> tuple[torch.Tensor, float]:
    """(wave scaled to `target_lufs`, its measured loudness). Silence, a clip too short to measure, or a
    loudness beyond ±100 LUFS (MultiTalk's guard) comes back unchanged. No clipping is applied: a quiet
    target never needs it, and the encoder takes any amplitude."""
    if not math.isfinite(target_lufs):
        raise ValueError(f"target loudness must be a finite LUFS value (e.g. -23), got {target_lufs}")
    measured = integrated_loudness(wave, rate)
    if not math.isfinite(measured) or abs(measured) > 100:
        return wave, measured
    gain = 10.0 ** ((target_lufs - measured) / 20.0)
    return (wave.double() * gain).to(wave.dtype), measured
