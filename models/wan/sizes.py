"""The video sizes Wan makes: sides multiples of 16 pixels (8 for the VAE, 2 for the DiT's patch), 1 + 4k frames."""

from __future__ import annotations

import math

SIZE_MULTIPLE = 16       # pixels: 8 for the VAE × 2 for the DiT's patch


def round_video_size(width: int, height: int, num_frames: int) -> tuple[int, int, int, str | None]:
    """Round to what Wan can make (sides multiples of 16, 1+4k frames); the note says what changed."""
    def nearest(value: float) -> int:  # halves round up (Python's round() would go to even)
        return int(math.floor(value + 0.5))

    w = max(SIZE_MULTIPLE, nearest(width / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    h = max(SIZE_MULTIPLE, nearest(height / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    f = 1 + 4 * max(0, nearest((num_frames - 1) / 4))
    changes = []
    if (w, h) != (width, height):
        changes.append(f"size {width}x{height} -> {w}x{h} (multiples of {SIZE_MULTIPLE})")
    if f != num_frames:
        changes.append(f"{num_frames} frames -> {f} (Wan makes 1+4k frames)")
    return w, h, f, ("Wan: rounded " + "; ".join(changes)) if changes else None
