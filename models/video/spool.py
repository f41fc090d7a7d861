"""Frames decoded in chunks, kept on disk instead of in memory, read back as one IMAGE tensor.

Video Combine's latent input decodes a few frames at a time; each chunk is appended here as float32
and dropped from memory. `frames()` then maps the whole file as a [N,H,W,C] tensor: the encoder
reads it one frame at a time (pingpong, loops and GIF's two passes need random access, which a
pipe could not give), and the operating system pages frames in and out as needed, so resident
memory stays near one chunk however long the clip. The file is anonymous (tempfile.TemporaryFile):
it disappears when the last reference to the tensor goes, and a killed process leaves nothing.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch


class SpoolError(ValueError):
    """A chunk does not fit the ones before it; the message says how."""


class FrameSpool:
    """Append [n,H,W,C] chunks; frames() gives the concatenation as a disk-backed tensor."""

    def __init__(self, directory: str | None = None):
        self._file = tempfile.TemporaryFile(prefix="slipstream-frames-", dir=directory)
        self._shape: tuple[int, int, int] | None = None
        self.count = 0

    def append(self, chunk: torch.Tensor) -> None:
        if not isinstance(chunk, torch.Tensor) or chunk.ndim != 4:
            got = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
            raise SpoolError(f"a decoded chunk must be IMAGE [frames, height, width, channels], got {got}")
        shape = tuple(int(s) for s in chunk.shape[1:])
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise SpoolError(f"decoded frames changed size from {self._shape} to {shape} (height, width, channels) "
                             f"after {self.count} frame(s); all frames of one video must have the same size.")
        data = chunk.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        self._file.write(data.tobytes())
        self.count += int(chunk.shape[0])

    def frames(self) -> torch.Tensor:
        """All appended frames as one float32 tensor backed by the file (copy-on-write: edits never reach it)."""
        if self._shape is None or self.count == 0:
            raise SpoolError("no frames were decoded: the latent holds no frames")
        self._file.flush()
        mapped = np.memmap(self._file, dtype=np.float32, mode="c", shape=(self.count, *self._shape))
        return torch.from_numpy(mapped)

    def close(self) -> None:
        """Drop this spool's handle; a tensor from frames() keeps the mapping (and the data) alive."""
        self._file.close()
