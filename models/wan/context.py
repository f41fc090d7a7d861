"""Context windows: denoise a long video as overlapping windows of latent frames and fuse them.

Windows are lists of latent-frame indices. Three schedules (the AnimateDiff/WanVideoWrapper ones):
- static_standard: fixed windows every (size − overlap) frames, the last one pulled back to end at T−1.
- uniform_standard: window starts rotate each step (by T·ordered_halving(step)); windows that would
  wrap past the end are slid back to end at T−1, and duplicates dropped.
- uniform_looped: the same rotation, wrapping windows kept (for seamless loops).
A context stride s > 1 adds dilated windows (every 2nd, 4th … frame) for long-range coherence.

User-facing numbers are pixel frames (like the frame count everywhere else); `ContextOptions.latent`
converts them: length (n−1)//4+1, stride n//4, overlap n//4 (81/4/16 pixel → 21/1/4 latent).
Fuse weights per window: `linear` ramps over the overlap (0→1 in, 1→0 out, none at the video's
ends), `pyramid` a triangle. FreeNoise makes later windows start from shuffled copies of earlier
noise so neighbouring windows agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCHEDULES = ("uniform_standard", "uniform_looped", "static_standard")
FUSE_METHODS = ("linear", "pyramid")


@dataclass(frozen=True)
class ContextOptions:
    """What the Context Options node produces (pixel frames, as the user typed them)."""

    schedule: str = "uniform_standard"
    frames: int = 81
    stride: int = 4
    overlap: int = 16
    freenoise: bool = True
    fuse_method: str = "linear"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown context schedule '{self.schedule}'. Valid choices: {', '.join(SCHEDULES)}.")
        if self.fuse_method not in FUSE_METHODS:
            raise ValueError(f"Unknown fuse method '{self.fuse_method}'. Valid choices: {', '.join(FUSE_METHODS)}.")

    def latent(self) -> tuple[int, int, int]:
        """(window length, stride, overlap) in latent frames."""
        size = (self.frames - 1) // 4 + 1
        stride = max(1, self.stride // 4)
        overlap = max(0, min(self.overlap // 4, size - 1))
        return size, stride, overlap


def ordered_halving(step: int) -> float:
    """0, 0.5, 0.25, 0.75, 0.125, … : the 64-bit reversal of `step` as a fraction."""
    return int(f"{step:064b}"[::-1], 2) / (1 << 64)


def _rotating_windows(step: int, frames: int, size: int, stride: int, overlap: int,
                      closed_loop: bool = True) -> list[list[int]]:
    """Windows (wrapping modulo `frames`) whose starts rotate with the step; dilated ones for stride > 1."""
    stride = min(stride, int(math.ceil(math.log2(frames / size))) + 1)
    phase = ordered_halving(step)
    windows = []
    for level in range(stride):
        dilation = 1 << level
        pad = int(round(frames * phase))
        start = int(phase * dilation) + pad
        end = frames + pad + (0 if closed_loop else -overlap)
        for j in range(start, end, size * dilation - overlap):
            windows.append([e % frames for e in range(j, j + size * dilation, dilation)])
    return windows


def _wrap_point(window: list[int]) -> int | None:
    """Index where a window's frame numbers fall back (it wrapped past the end), or None."""
    for i in range(1, len(window)):
        if window[i] < window[i - 1]:
            return i
    return None


def _slid_to_end(window: list[int], frames: int) -> list[int]:
    """The same frame pattern re-based to start at 0, then slid so it ends at frames−1."""
    rebased = [(v - window[0]) % frames for v in window]
    delta = frames - 1 - rebased[-1]
    return [v + delta for v in rebased]


def uniform_standard(step: int, frames: int, size: int, stride: int, overlap: int) -> list[list[int]]:
    if frames <= size:
        return [list(range(frames))]
    windows = _rotating_windows(step, frames, size, stride, overlap)
    i = 0
    while i < len(windows):
        cut = _wrap_point(windows[i])
        if cut is not None:
            first_wrapped = windows[i][cut]
            windows[i] = _slid_to_end(windows[i], frames)
            if first_wrapped not in windows[(i + 1) % len(windows)]:
                windows.insert(i + 1, list(range(first_wrapped, first_wrapped + size)))
        i += 1
    unique: list[list[int]] = []
    for w in windows:
        if w not in unique:
            unique.append(w)
    return unique


def uniform_looped(step: int, frames: int, size: int, stride: int, overlap: int) -> list[list[int]]:
    if frames <= size:
        return [list(range(frames))]
    return _rotating_windows(step, frames, size, stride, overlap)


def static_standard(step: int, frames: int, size: int, stride: int, overlap: int) -> list[list[int]]:
    if frames <= size:
        return [list(range(frames))]
    windows, delta = [], max(1, size - overlap)
    for start in range(0, frames, delta):
        if start + size >= frames:
            windows.append(list(range(frames - size, frames)))
            break
        windows.append(list(range(start, start + size)))
    return windows


_SCHEDULE_FUNCS: dict[str, Callable[[int, int, int, int, int], list[list[int]]]] = {
    "uniform_standard": uniform_standard, "uniform_looped": uniform_looped, "static_standard": static_standard,
}


def context_windows(schedule: str, step: int, frames: int, size: int, stride: int, overlap: int) -> list[list[int]]:
    """The windows (latent-frame index lists) to run at `step` for a latent of `frames` frames."""
    if schedule not in _SCHEDULE_FUNCS:
        raise ValueError(f"Unknown context schedule '{schedule}'. Valid choices: {', '.join(SCHEDULES)}.")
    if size < 1:
        raise ValueError(f"context window must hold at least 1 latent frame, got {size}")
    return _SCHEDULE_FUNCS[schedule](step, frames, size, stride, overlap)


def window_weights(window: list[int], frames: int, overlap: int, method: str = "linear",
                   looped: bool = False) -> torch.Tensor:
    """Per-frame fuse weight of one window (float32, len(window))."""
    n = len(window)
    weights = torch.ones(n)
    touches_start, touches_end = min(window) == 0, max(window) == frames - 1
    overlap = min(overlap, n)
    if method == "linear":
        if overlap > 0 and (not touches_start or (looped and touches_end)):
            weights[:overlap] = torch.linspace(0, 1, overlap)
        if overlap > 0 and (not touches_end or (looped and touches_start)):
            weights[n - overlap:] = torch.linspace(1, 0, overlap)
        return weights
    if method == "pyramid":
        half = (n + 1) // 2
        ramp = torch.arange(1, half + 1, dtype=torch.float32)
        tri = torch.cat([ramp, ramp.flip(0)[n % 2:]]) if n > 1 else torch.ones(1)
        weights = tri / tri.max()
        if not looped and overlap > 0:
            if touches_start:
                weights[:overlap] = torch.maximum(weights[:overlap], torch.linspace(0, 1, overlap))
            if touches_end:
                weights[n - overlap:] = torch.maximum(weights[n - overlap:], torch.linspace(1, 0, overlap))
        return weights
    raise ValueError(f"Unknown fuse method '{method}'. Valid choices: {', '.join(FUSE_METHODS)}.")


class WindowFuser:
    """Accumulates per-window predictions along a frame axis and returns their weighted mean.

    A frame whose only coverage is ramp ends (total weight 0) gets the plain mean of its windows
    instead of 0/0.
    """

    def __init__(self, like: torch.Tensor, frame_dim: int):
        self.frame_dim = frame_dim
        self.total = torch.zeros_like(like)
        self.plain = torch.zeros_like(like)
        shape = [1] * like.dim()
        shape[frame_dim] = like.shape[frame_dim]
        self.weight = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.count = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def add(self, window: list[int], pred: torch.Tensor, weights: torch.Tensor) -> None:
        idx = torch.tensor(window, device=pred.device)
        shape = [1] * pred.dim()
        shape[self.frame_dim] = len(window)
        w = weights.to(pred.device, pred.dtype).view(shape)
        self.total.index_add_(self.frame_dim, idx, pred * w)
        self.plain.index_add_(self.frame_dim, idx, pred)
        self.weight.index_add_(self.frame_dim, idx, w)
        self.count.index_add_(self.frame_dim, idx, torch.ones_like(w))

    def result(self) -> torch.Tensor:
        if torch.any(self.count == 0):
            missing = (self.count.flatten() == 0).nonzero().flatten().tolist()
            raise RuntimeError(f"context windows left latent frame(s) {missing} uncovered")
        covered = self.weight > 0
        weighted = self.total / torch.where(covered, self.weight, torch.ones_like(self.weight))
        return torch.where(covered, weighted, self.plain / self.count)


def freenoise(noise: torch.Tensor, size: int, overlap: int, generator: torch.Generator, frame_dim: int = 1) -> torch.Tensor:
    """Reuse shuffled noise frames past each window so overlapping windows start from related noise."""
    frames = noise.shape[frame_dim]
    delta = size - overlap
    if delta <= 0 or frames <= size:
        return noise
    out = noise.clone()
    for start in range(0, frames - size, delta):
        place = start + size
        if place >= frames:
            break
        count = min(delta, frames - place)
        perm = torch.randperm(count, generator=generator) + start
        src = out.index_select(frame_dim, perm.to(out.device))
        out.narrow(frame_dim, place, count).copy_(src)
        if place + delta > frames:
            break
    return out
