"""Video Combine's VIDEO output as ComfyUI's own value (imported lazily, only inside ComfyUI).

A saved mp4/webm becomes `VideoFromFile(path)`: core nodes (SaveVideo, GetVideoComponents, ...)
then read the very file the user sees, audio and metadata included. Animated WebP cannot be decoded
by the PyAV build ComfyUI uses, and core SaveVideo cannot copy a GIF stream into mp4, so those two
become `VideoFromComponents` over the frames as written (the caller passes them lazily). ComfyUI
builds without `comfy_api`'s video types (before VIDEO existed) get None.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any


def _video_types() -> tuple[Any, Any, Any] | None:
    try:
        from comfy_api.latest import InputImpl, Types

        return InputImpl.VideoFromFile, InputImpl.VideoFromComponents, Types.VideoComponents
    except ImportError:
        pass
    try:
        from comfy_api.input_impl import VideoFromComponents, VideoFromFile
        from comfy_api.util import VideoComponents

        return VideoFromFile, VideoFromComponents, VideoComponents
    except ImportError:
        return None


def video_value(path: str, frame_rate: Fraction, frames: Callable[[], Any] | None = None) -> Any:
    """VideoFromFile(path), or VideoFromComponents(frames()) when a frame source is given; None if ComfyUI
    lacks VIDEO. `frames` is a callable so the frames are only gathered when they are really needed."""
    types = _video_types()
    if types is None:
        return None
    from_file, from_components, components = types
    if frames is None:
        return from_file(path)
    return from_components(components(images=frames(), frame_rate=Fraction(frame_rate)))
