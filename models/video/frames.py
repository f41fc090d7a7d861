"""From an IMAGE batch to the raw bytes ffmpeg reads, one frame at a time.

The batch is already in memory (it is the node's input); everything here works frame by frame
with buffers allocated once, so encoding 10 000 frames costs the same extra memory as encoding 10.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


class FrameError(ValueError):
    """The frames cannot be encoded as given; the message says what to change."""


@dataclass(frozen=True)
class FrameCheck:
    """What a pass over the batch found: its shape and whether values had to be clamped."""

    count: int
    height: int
    width: int
    channels: int
    out_of_range_frames: int      # frames with values outside 0..1 (they are clamped)

    @property
    def has_alpha(self) -> bool:
        return self.channels == 4


def _as_float_cpu(frame: torch.Tensor) -> torch.Tensor:
    """One frame as float32 on the CPU; a no-op for the usual CPU float32 IMAGE."""
    if frame.device.type != "cpu" or frame.dtype != torch.float32:
        frame = frame.to(device="cpu", dtype=torch.float32)
    return frame


def check_frames(images: torch.Tensor, check_interrupt: Callable[[], None] | None = None) -> FrameCheck:
    """Refuse what cannot be encoded (no frames, wrong shape, NaN) before ffmpeg starts.

    The pass reads every frame (thousands of HD frames take seconds), so it stops on an interrupt.
    """
    if not isinstance(images, torch.Tensor):
        raise FrameError(f"images must be an IMAGE tensor [frames, height, width, channels], got {type(images).__name__}")
    if images.ndim == 3:
        raise FrameError(f"images has shape {tuple(images.shape)}: that looks like one image without a batch "
                         "dimension, or a MASK. Video Combine needs IMAGE [frames, height, width, channels].")
    if images.ndim != 4:
        raise FrameError(f"images has shape {tuple(images.shape)}; expected IMAGE [frames, height, width, channels].")
    count, height, width, channels = (int(s) for s in images.shape)
    if count == 0:
        raise FrameError("images is an empty batch (0 frames): there is nothing to encode. "
                         "Check the node that produced it (a decode or a frame selection that matched nothing).")
    if height == 0 or width == 0:
        raise FrameError(f"images has frames of size {width}×{height}; a video needs at least 1×1 pixels.")
    if channels not in (1, 3, 4):
        raise FrameError(f"images has {channels} channels per pixel; expected 3 (RGB), 4 (RGBA) or 1 (grey). "
                         "If the last dimension is not channels, the tensor is not in IMAGE layout [B,H,W,C].")
    if not (images.dtype.is_floating_point):
        raise FrameError(f"images has dtype {images.dtype}; IMAGE values are floats in 0..1.")
    out_of_range = 0
    for index in range(count):
        if check_interrupt is not None:
            check_interrupt()
        low, high = torch.aminmax(_as_float_cpu(images[index]))
        low_v, high_v = float(low), float(high)
        if low_v != low_v or high_v != high_v:  # NaN propagates through min/max
            raise FrameError(f"frame {index} contains NaN values, so it has no colour to encode. This usually means "
                             "the sampler or VAE diverged (try another dtype, e.g. fp32/bf16 instead of fp16, or a "
                             "lower cfg); nothing was written.")
        if low_v < 0.0 or high_v > 1.0:
            out_of_range += 1
    return FrameCheck(count, height, width, channels, out_of_range)


def frame_order(count: int, pingpong: bool, repeats: int = 1) -> Iterator[int]:
    """Frame indices in output order: 0..n-1 (then n-2..1 with pingpong), the whole repeated `repeats` times."""
    for _ in range(repeats):
        yield from range(count)
        if pingpong:
            yield from range(count - 2, 0, -1)


def even_sample(count: int, wanted: int) -> list[int]:
    """Up to `wanted` frame indices spread evenly over 0..count-1, first and last included."""
    if wanted >= count:
        return list(range(count))
    if wanted <= 1:
        return [0]
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def order_length(count: int, pingpong: bool, repeats: int = 1) -> int:
    one = count + max(count - 2, 0) if pingpong else count
    return one * repeats


class FrameConverter:
    """Turns one float frame [H,W,C] into contiguous uint8 (or little-endian uint16) RGB/RGBA, padded if asked.

    Rounding matches ComfyUI's savers: clamp(x·255 + 0.5) truncated to uint8 (x·65535 for 16 bits). Padding repeats the
    last row/column (a black border would show as a line after chroma subsampling). Flattening
    alpha composites onto black, i.e. what the pixels look like premultiplied.
    """

    def __init__(self, height: int, width: int, channels: int, keep_alpha: bool, pad_to_even: bool,
                 depth: int = 8):
        if depth not in (8, 16):
            raise ValueError(f"depth must be 8 or 16 bits per channel, got {depth}")
        self.height, self.width, self.channels = height, width, channels
        self.depth = depth
        self.keep_alpha = keep_alpha and channels == 4
        self.out_channels = 4 if self.keep_alpha else 3
        self.out_height = height + (height % 2 if pad_to_even else 0)
        self.out_width = width + (width % 2 if pad_to_even else 0)
        if depth == 8:
            self.pix_fmt = "rgba" if self.keep_alpha else "rgb24"
        else:
            self.pix_fmt = "rgba64le" if self.keep_alpha else "rgb48le"
        self._scale = 255.0 if depth == 8 else 65535.0
        self._float = torch.empty((height, width, self.out_channels), dtype=torch.float32)
        shape = (self.out_height, self.out_width, self.out_channels)
        self._bytes = np.empty(shape, dtype=np.uint8 if depth == 8 else np.dtype("<u2"))
        # torch has no general uint16 arithmetic: 16-bit values go through an int32 buffer.
        self._wide = None if depth == 8 else torch.empty(shape, dtype=torch.int32)
        self._bytes_t = torch.from_numpy(self._bytes) if depth == 8 else self._wide

    @property
    def frame_bytes(self) -> int:
        return self._bytes.nbytes

    @property
    def padded(self) -> bool:
        return (self.out_height, self.out_width) != (self.height, self.width)

    def convert(self, frame: torch.Tensor) -> np.ndarray:
        """The frame as a uint8 array [H',W',C'] (valid until the next call: the buffer is reused)."""
        src = _as_float_cpu(frame)
        buf = self._float
        if self.channels == 1:
            buf.copy_(src.expand(self.height, self.width, 3))
        elif self.channels == 4 and not self.keep_alpha:
            torch.mul(src[..., :3], src[..., 3:4].clamp(0.0, 1.0), out=buf)
        else:
            buf.copy_(src[..., : self.out_channels])
        buf.mul_(self._scale).add_(0.5).clamp_(0.0, self._scale)
        out = self._bytes
        self._bytes_t[: self.height, : self.width].copy_(buf)
        if self._wide is not None:
            np.copyto(out[: self.height, : self.width], self._wide[: self.height, : self.width].numpy(),
                      casting="unsafe")
        if self.out_width > self.width:
            out[: self.height, self.width:] = out[: self.height, self.width - 1: self.width]
        if self.out_height > self.height:
            out[self.height:] = out[self.height - 1: self.height]
        return out
