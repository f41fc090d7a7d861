"""Video Combine: frames (and sound) to gif, webp, mp4 or webm — where every video workflow ends.

The node is thin: it resolves where the file goes (host.save_target), lets models/video encode
into a staged temporary name, publishes under a numbered name only after ffmpeg succeeded, and
answers with ComfyUI's core preview dict so the frontend shows the result without custom JS.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import ExitStack
from typing import Any

import torch

from ..host import (
    ProgressBar,
    check_interrupt,
    counter_of,
    metadata_disabled,
    notice,
    prefix_problem,
    publish,
    save_target,
    staged_file,
    ui_file,
    video_value,
)
from ..models.video.encode import EncodeSettings, encode_frames
from ..models.video.ffmpeg import ENV_VAR, find_ffmpeg, find_ffmpeg_or_none
from ..models.video.formats import (
    FORMATS,
    PIX_FMT_CHOICES,
    available_formats,
    check_choice,
    get_format,
    missing_formats,
)
from ..models.video.frames import frame_order
from ..models.video.metadata import comfy_metadata, save_first_frame_png

log = logging.getLogger("slipstream.video")

DEFAULT_FORMAT = "video/h264-mp4"


@functools.lru_cache(maxsize=8)
def _log_missing(reasons: tuple[str, ...]) -> None:
    for reason in reasons:
        log.warning("Video Combine: %s", reason)


def _format_choices() -> tuple[list[str], str]:
    """(formats to list, tooltip) for the ffmpeg found now."""
    build, why = find_ffmpeg_or_none()
    missing = missing_formats(build)
    names = [f.name for f in available_formats(build)]
    tip = ("Output format. image/gif and image/webp loop by themselves; video/* formats carry sound and the "
           "workflow. ")
    if build is None:
        names = [f.name for f in FORMATS]    # keep saved workflows loadable; running explains the problem
        tip += f"NO FFMPEG FOUND, so none of these can be written: {why}"
    else:
        tip += f"Listed: what ffmpeg {build.version} (from {build.source}) can write."
        if missing:
            tip += " Not listed: " + "; ".join(missing.values()) + f". Set {ENV_VAR} to a fuller ffmpeg build."
            _log_missing(tuple(missing.values()))
    return names, tip


class SlipstreamVideoCombine:
    """Frames to an animated image or a video file, with a preview, the workflow inside, and no lost files."""

    CATEGORY = "Slipstream/Video"
    FUNCTION = "combine"
    OUTPUT_NODE = True
    RETURN_TYPES = ("SLIP_FILENAMES", "VIDEO")
    RETURN_NAMES = ("filenames", "video")
    OUTPUT_TOOLTIPS = (
        "The files written, as absolute paths: the first-frame PNG carrying the workflow (unless metadata is "
        "disabled), then the video.",
        "The saved video as ComfyUI's VIDEO value, for core video nodes (Save Video, Get Video Components).",
    )
    DESCRIPTION = (
        "Encodes an IMAGE batch into an animated GIF/WebP or an mp4/webm video through ffmpeg, one frame at a time "
        "(memory stays flat however long the clip), with optional sound muxed into mp4/webm. Shows the result on the "
        "node, embeds the workflow and prompt (video tags + a first-frame PNG you can drag back onto the canvas), "
        "and never overwrites: files get the next free number and appear only once ffmpeg has finished."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        formats, format_tip = _format_choices()
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames, in order. RGBA keeps its alpha in image/webp and "
                                                "video/vp9-webm and is flattened onto black elsewhere."}),
                "frame_rate": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 240.0, "step": 1.0, "round": 0.001,
                                         "tooltip": "Frames per second. Wan 2.1 makes 16 fps video; fractional "
                                                    "rates such as 23.976 are kept exactly."}),
                "loop_count": ("INT", {"default": 0, "min": 0, "max": 100,
                                       "tooltip": "image/gif and image/webp: how many times the file loops "
                                                  "(0 = forever). video/*: the clip is repeated this many extra "
                                                  "times in the file (0 = play once)."}),
                "filename_prefix": ("STRING", {"default": "video/Slipstream",
                                               "tooltip": "Name of the file, with sub-folders (video/clip) and "
                                                          "patterns like %date:yyyy-MM-dd%. A counter is added; "
                                                          "existing files are never overwritten."}),
                "format": (formats, {"default": DEFAULT_FORMAT if DEFAULT_FORMAT in formats else formats[0],
                                     "tooltip": format_tip}),
                "pingpong": ("BOOLEAN", {"default": False,
                                         "tooltip": "Play forward then backward (n frames become 2n−2), for a "
                                                    "seamless loop."}),
                "save_output": ("BOOLEAN", {"default": True,
                                            "tooltip": "On: save to the output folder. Off: a preview in the temp "
                                                       "folder, which ComfyUI clears on restart."}),
                "crf": ("INT", {"default": -1, "min": -1, "max": 63,
                                "tooltip": "video/* quality: lower = better and bigger. -1 = the format's default "
                                           "(h264 19, h265 22, vp9 20, av1 23). h264/h265 accept 0-51."}),
                "pix_fmt": (list(PIX_FMT_CHOICES), {"default": "auto",
                                                    "tooltip": "video/* pixel format. auto = the format's default "
                                                               "(yuv420p for h264/vp9, 10-bit yuv420p10le for "
                                                               "h265/av1, yuva420p for vp9 with alpha). Odd sizes "
                                                               "are padded to even for yuv420."}),
                "lossless": ("BOOLEAN", {"default": False,
                                         "tooltip": "image/webp only: exact colours, much bigger files."}),
                "quality": ("INT", {"default": 90, "min": 0, "max": 100,
                                    "tooltip": "image/webp only (when not lossless): 0-100, higher = better."}),
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "Sound to mux into mp4/webm, cut or padded with silence to the "
                                               "video's length. Ignored (with a note) for gif/webp."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):  # noqa: N802 (ComfyUI's name)
        """Refuse a prefix no file can be saved under when the prompt is queued, not after the generation.

        Only filename_prefix is checked here: ComfyUI attaches whatever this returns to every input it
        names, so checking format, crf and pix_fmt here too made one bad format read as three errors.
        ComfyUI's own list check covers format (the list holds what this ffmpeg can write, and the
        tooltip says why the others are missing); crf and pix_fmt are checked against the format when
        the node runs, before anything is encoded.
        """
        return prefix_problem(filename_prefix)

    def combine(self, images: torch.Tensor, frame_rate: float, loop_count: int, filename_prefix: str, format: str,
                pingpong: bool, save_output: bool, crf: int, pix_fmt: str, lossless: bool, quality: int,
                audio: dict | None = None, prompt: Any = None, extra_pnginfo: dict | None = None) -> dict[str, Any]:
        fmt = get_format(format)
        build = find_ffmpeg()
        problem = check_choice(format, pix_fmt, crf, build)   # before any file or folder is made
        if problem is not None:
            raise ValueError(problem)
        with_metadata = not metadata_disabled()
        tags = comfy_metadata(prompt, extra_pnginfo) if with_metadata else {}
        settings = EncodeSettings(format, frame_rate, loop_count, pingpong, crf, pix_fmt, lossless, quality, tags)
        height, width = (int(images.shape[1]), int(images.shape[2])) if getattr(images, "ndim", 0) == 4 else (0, 0)
        target = save_target(filename_prefix, temp=not save_output, width=width, height=height,
                             node="Video Combine")
        bar = ProgressBar(1)

        with ExitStack() as stack:
            staged_video = stack.enter_context(staged_file(target, fmt.extension))
            result = encode_frames(images, settings, staged_video, audio=audio, ffmpeg=build,
                                   progress=lambda done, total: bar.update_absolute(done, total),
                                   check_interrupt=check_interrupt)
            staged_png = None
            if with_metadata:
                staged_png = stack.enter_context(staged_file(target, "png"))
                save_first_frame_png(images, staged_png, tags)
            video_path = publish(staged_video, target, fmt.extension)
            files = [video_path]
            if staged_png is not None:
                files.insert(0, publish(staged_png, target, "png", counter_of(video_path, target)))
        for note in result.notes:
            notice("Video Combine", f"{os.path.basename(video_path)}: {note}")

        def frames_as_written() -> torch.Tensor:
            order = list(frame_order(images.shape[0], pingpong))
            return images if len(order) == images.shape[0] else images[torch.tensor(order)]

        video = video_value(video_path, frame_rate=result.frame_rate, width=result.width, height=result.height,
                            frame_count=result.frame_count, frames=None if fmt.video_from_file else frames_as_written)
        ui = {"images": [ui_file(video_path, target)], "animated": (True,)}
        return {"ui": ui, "result": (files, video)}
