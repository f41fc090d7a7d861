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


def decode_latent_chunks(vae: Any, latent: Any, chunk_frames: int) -> tuple[int, Any]:
    """(number of chunks, iterator of IMAGE chunks) decoding a core LATENT through a core VAE's decode().

    Image latents [B,C,H,W] (one latent per frame) are decoded `chunk_frames` at a time: VAE.decode
    is per image, so the chunks give exactly the frames one big decode would. Video latents
    [B,C,T,H,W] are decoded one clip at a time: a causal video VAE carries state along T, so cutting
    T would change the frames; the core VAE splits its own work to fit memory. VAE.decode returns
    [B,T,H,W,C] for those; each clip's frames are flattened into the batch, as core VAE Decode does.
    """
    if not hasattr(vae, "decode"):
        raise TypeError(f"vae must be ComfyUI's VAE (from Load VAE or a checkpoint loader), got {type(vae).__name__}")
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is None or not hasattr(samples, "ndim") or samples.ndim not in (4, 5):
        shape = tuple(samples.shape) if hasattr(samples, "shape") else type(samples).__name__
        raise ValueError(f"latent must be a LATENT with 'samples' [frames, C, H, W] or [batch, C, T, H, W], got {shape}")
    if chunk_frames < 1:
        raise ValueError(f"decode_chunk must be 1 or more, got {chunk_frames}")
    step = chunk_frames if samples.ndim == 4 else 1
    starts = range(0, int(samples.shape[0]), step)

    def chunks():
        for start in starts:
            images = vae.decode(samples[start:start + step])
            if images.ndim == 5:
                images = images.reshape(-1, *images.shape[-3:])
            yield images

    return len(starts), chunks()
