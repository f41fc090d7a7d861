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


def lazy_frames_video(from_components: type, components: type, frames: Callable[[], Any], frame_rate: Fraction,
                      width: int, height: int, frame_count: int) -> Any:
    """A VideoFromComponents that gathers its frames only when a consumer asks, and never keeps them.

    Pingpong GIF/WebP frames are a reordered copy of the clip; holding that copy in the VIDEO output
    doubled the clip's memory for as long as ComfyUI cached the node. Dimensions, frame count and rate
    are known without the frames, so only get_components() and save_to() build them, for that call.
    """

    class LazyFramesVideo(from_components):
        def __init__(self) -> None:       # the base __init__ would store the frames: exactly what we avoid
            pass

        def get_components(self) -> Any:
            return components(images=frames(), frame_rate=Fraction(frame_rate))

        def save_to(self, path: str, *args: Any, **kwargs: Any) -> Any:
            return from_components(self.get_components()).save_to(path, *args, **kwargs)

        def get_dimensions(self) -> tuple[int, int]:
            return int(width), int(height)

        def get_frame_count(self) -> int:
            return int(frame_count)

        def get_frame_rate(self) -> Fraction:
            return Fraction(frame_rate)

        def get_duration(self) -> float:
            return float(frame_count / Fraction(frame_rate))

    return LazyFramesVideo()


def video_value(path: str, frame_rate: Fraction, frames: Callable[[], Any] | None = None, *,
                width: int = 0, height: int = 0, frame_count: int = 0) -> Any:
    """VideoFromFile(path), or a lazy VideoFromComponents over frames() when a frame source is given; None
    if ComfyUI lacks VIDEO. `frames` is a callable so the frames are only gathered when really needed."""
    types = _video_types()
    if types is None:
        return None
    from_file, from_components, components = types
    if frames is None:
        return from_file(path)
    return lazy_frames_video(from_components, components, frames, Fraction(frame_rate), width, height, frame_count)
