"""Video Combine: frames (and sound) to gif, webp, mp4, webm, mov, mkv or a PNG sequence — where every video
workflow ends.

The node is thin: it resolves where the file goes (host.save_target), lets models/video encode
into a staged temporary name (a staged folder for png sequences), publishes under a numbered name
only after ffmpeg succeeded, and answers with ComfyUI's core preview dict so the frontend shows the
result without custom JS for the preview. Format names follow the widely used Video Combine node, so its
workflows load with their format intact. Which inputs each format has comes from formats.widget_table(),
sent with the format input to web/js/video_combine_formats.js, which shows only those.

Long clips: the optional latent + vae inputs decode through the core VAE a chunk at a time into a
disk-backed spool (models/video/spool.py), so the decoded video is never held in memory as one IMAGE.
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
    decode_latent_chunks,
    metadata_disabled,
    notice,
    prefix_problem,
    publish,
    publish_folder,
    save_target,
    staged_file,
    staged_folder,
    ui_file,
    video_value,
)
from ..models.video.command import sequence_name
from ..models.video.encode import EncodeSettings, encode_frames
from ..models.video.ffmpeg import ENV_VAR, find_ffmpeg, find_ffmpeg_or_none
from ..models.video.formats import (
    FORMATS,
    PIX_FMT_CHOICES,
    available_formats,
    check_choice,
    get_format,
    missing_formats,
    widget_table,
)
from ..models.video.frames import frame_order
from ..models.video.metadata import comfy_metadata, save_first_frame_png
from ..models.video.spool import FrameSpool

log = logging.getLogger("slipstream.video")

DEFAULT_FORMAT = "video/h264-mp4"
# Key of the format input's options that carries widget_table() to web/js/video_combine_formats.js.
FORMAT_WIDGETS_KEY = "slipstream_format_widgets"


@functools.lru_cache(maxsize=8)
def _log_missing(reasons: tuple[str, ...]) -> None:
    for reason in reasons:
        log.warning("Video Combine: %s", reason)


def _format_choices() -> tuple[list[str], str, dict[str, Any]]:
    """(formats to list, tooltip, the format -> inputs table for the frontend) for the ffmpeg found now."""
    build, why = find_ffmpeg_or_none()
    missing = missing_formats(build)
    names = [f.name for f in available_formats(build)]
    tip = ("Output format. image/gif and image/webp loop by themselves; video/* files carry sound and the "
           "workflow; image/png and video/16bit-png write a folder of numbered PNGs (the first holds the "
           "workflow). video/vp9-webm is video/webm's earlier name. ")
    if build is None:
        names = [f.name for f in FORMATS]    # keep saved workflows loadable; running explains the problem
        tip += f"NO FFMPEG FOUND, so none of these can be written: {why}"
    else:
        tip += f"Listed: what ffmpeg {build.version} (from {build.source}) can write."
        if missing:
            tip += " Not listed: " + "; ".join(missing.values()) + f". Set {ENV_VAR} to a fuller ffmpeg build."
            _log_missing(tuple(missing.values()))
    return names, tip, widget_table(build)


class SlipstreamVideoCombine:
    """Frames to an animated image, a video file or a PNG sequence, with a preview, the workflow inside, and no
    lost files."""

    CATEGORY = "Slipstream/Video"
    FUNCTION = "combine"
    OUTPUT_NODE = True
    RETURN_TYPES = ("SLIP_FILENAMES", "VIDEO")
    RETURN_NAMES = ("filenames", "video")
    OUTPUT_TOOLTIPS = (
        "The files written, as absolute paths: the first-frame PNG carrying the workflow (unless metadata is "
        "off), then the video. For png sequences: every frame's file, in order (the first holds the workflow).",
        "The saved video as ComfyUI's VIDEO value, for core video nodes (Save Video, Get Video Components).",
    )
    DESCRIPTION = (
        "Encodes an IMAGE batch (or a LATENT through a VAE, decoded in chunks) into an animated GIF/WebP, an "
        "mp4/webm/ProRes mov/ffv1 mkv video, or a folder of 8- or 16-bit PNGs, through ffmpeg, one frame at a time "
        "(memory stays flat however long the clip), with optional sound muxed into the video (trim_to_audio cuts "
        "the video to it). Format names match the well-known Video Combine node. Shows the result on the node, "
        "embeds the workflow and prompt (video tags and a comment tag, a first-frame PNG you can drag back onto "
        "the canvas) unless save_metadata is off, and never overwrites: files get the next free number and "
        "appear only once ffmpeg has finished. The node shows only the inputs the chosen format has; the others "
        "keep their values and are ignored (with a note when set), so switching formats never breaks a run."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        formats, format_tip, widgets = _format_choices()
        return {
            "required": {
                "frame_rate": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 240.0, "step": 1.0, "round": 0.001,
                                         "tooltip": "Frames per second. Wan 2.1 makes 16 fps video; fractional "
                                                    "rates such as 23.976 are kept exactly."}),
                "loop_count": ("INT", {"default": 0, "min": 0, "max": 100,
                                       "tooltip": "image/gif and image/webp: how many times the file loops "
                                                  "(0 = forever). Videos: the clip is repeated this many extra "
                                                  "times in the file (0 = play once). Hidden for PNG "
                                                  "sequences, which have no loop."}),
                "filename_prefix": ("STRING", {"default": "video/Slipstream",
                                               "tooltip": "Name of the file, with sub-folders (video/clip) and "
                                                          "patterns like %date:yyyy-MM-dd%. A counter is added; "
                                                          "existing files are never overwritten."}),
                # The table rides on the format input: the frontend shows only the inputs the chosen format
                # has, from the same data the encoder uses to ignore the others.
                "format": (formats, {"default": DEFAULT_FORMAT if DEFAULT_FORMAT in formats else formats[0],
                                     "tooltip": format_tip, FORMAT_WIDGETS_KEY: widgets}),
                "pingpong": ("BOOLEAN", {"default": False,
                                         "tooltip": "Play forward then backward (n frames become 2n−2), for a "
                                                    "seamless loop."}),
                "save_output": ("BOOLEAN", {"default": True,
                                            "tooltip": "On: save to the output folder. Off: a preview in the temp "
                                                       "folder, which ComfyUI clears on restart."}),
            },
            "optional": {
                "crf": ("INT", {"default": -1, "min": -1, "max": 63,
                                "tooltip": "Video quality: lower = better and bigger. -1 = the format's default "
                                           "(h264 19, h265 22, vp9 20, av1 23; nvenc: its -cq). h264/h265 accept "
                                           "0-51. Shown only for formats that have it (not gif, webp, ProRes, ffv1, "
                                           "png); a hidden value is kept and ignored."}),
                "pix_fmt": (list(PIX_FMT_CHOICES), {"default": "auto",
                                                    "tooltip": "Video pixel format. auto = the format's default "
                                                               "(yuv420p for h264/vp9, 10-bit yuv420p10le for "
                                                               "h265/av1, yuv422p10le for ProRes, gbrp16le for "
                                                               "ffv1; the alpha variant when frames have alpha). "
                                                               "Odd sizes are padded to even for yuv420. Lists "
                                                               "only the chosen format's pixel formats; hidden "
                                                               "(and ignored) for gif, webp and png."}),
                "lossless": ("BOOLEAN", {"default": True,
                                         "tooltip": "image/webp only: exact colours (on by default); off for much "
                                                    "smaller lossy files at `quality`. Shown only for "
                                                    "image/webp."}),
                "quality": ("INT", {"default": 90, "min": 0, "max": 100,
                                    "tooltip": "image/webp only: 0-100, higher = better "
                                                   "(lossless: compresses harder). Shown only for image/webp."}),
                "images": ("IMAGE", {"tooltip": "The frames, in order. RGBA keeps its alpha in image/webp, "
                                                "video/webm, ProRes, ffv1 and the PNG sequences, and is flattened "
                                                "onto black elsewhere. Connect this or latent + vae."}),
                "audio": ("AUDIO", {"tooltip": "Sound to mux into the video, cut or padded with silence to the "
                                               "video's length. Ignored (with a note) for gif/webp/png."}),
                "save_metadata": ("BOOLEAN", {"default": True,
                                              "tooltip": "Store the workflow and prompt: video tags (and a "
                                                         "`comment` tag as the well-known Video Combine writes), "
                                                         "a first-frame PNG beside the video, or text chunks in "
                                                         "a PNG sequence's first frame. ComfyUI's "
                                                         "--disable-metadata turns it off too."}),
                "trim_to_audio": ("BOOLEAN", {"default": False,
                                              "tooltip": "When the audio is shorter than the video, cut the video "
                                                         "to the audio's length (the last frame may overlap its "
                                                         "end). Off: the audio is padded with silence. Shown "
                                                         "only for formats that carry sound."}),
                "latent": ("LATENT", {"tooltip": "Instead of images: latents decoded through `vae` a chunk at a "
                                                 "time into a file on disk, so a long clip is never held in "
                                                 "memory as pixels."}),
                "vae": ("VAE", {"tooltip": "ComfyUI's VAE (Load VAE, a checkpoint loader) that decodes `latent`."}),
                "decode_chunk": ("INT", {"default": 16, "min": 1, "max": 4096,
                                         "tooltip": "Image latents decoded per VAE call (smaller = less memory). "
                                                    "Video latents [B,C,T,H,W] are decoded one clip at a time: "
                                                    "their VAE carries state along time."}),
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
        the node runs, before anything is encoded (and ignored by formats that do not have them).
        """
        return prefix_problem(filename_prefix)

    def combine(self, images: torch.Tensor | None = None, frame_rate: float = 16.0, loop_count: int = 0,
                filename_prefix: str = "video/Slipstream", format: str = DEFAULT_FORMAT, pingpong: bool = False,
                save_output: bool = True, crf: int = -1, pix_fmt: str = "auto", lossless: bool = True,
                quality: int = 90, audio: dict | None = None, save_metadata: bool = True,
                trim_to_audio: bool = False, latent: dict | None = None, vae: Any = None, decode_chunk: int = 16,
                prompt: Any = None, extra_pnginfo: dict | None = None) -> dict[str, Any]:
        fmt = get_format(format)
        build = find_ffmpeg()
        problem = check_choice(format, pix_fmt, crf, build)   # before any file or folder is made
        if problem is not None:
            raise ValueError(problem)
        images = self._frames(images, latent, vae, decode_chunk)
        with_metadata = save_metadata and not metadata_disabled()
        tags = comfy_metadata(prompt, extra_pnginfo) if with_metadata else {}
        settings = EncodeSettings(format, frame_rate, loop_count, pingpong, crf, pix_fmt, lossless, quality, tags,
                                  trim_to_audio=trim_to_audio)
        height, width = (int(images.shape[1]), int(images.shape[2])) if getattr(images, "ndim", 0) == 4 else (0, 0)
        target = save_target(filename_prefix, temp=not save_output, width=width, height=height,
                             node="Video Combine")
        bar = ProgressBar(1)

        def progress(done: int, total: int) -> None:
            bar.update_absolute(done, total)

        with ExitStack() as stack:
            if fmt.kind == "images":
                staged = stack.enter_context(staged_folder(target))
                result = encode_frames(images, settings, staged, audio=audio, ffmpeg=build, progress=progress,
                                       check_interrupt=check_interrupt)
                folder = publish_folder(staged, target)
                files = [os.path.join(folder, sequence_name(i)) for i in range(1, result.frame_count + 1)]
                video_path = files[0]
            else:
                staged_video = stack.enter_context(staged_file(target, fmt.extension))
                result = encode_frames(images, settings, staged_video, audio=audio, ffmpeg=build,
                                       progress=progress, check_interrupt=check_interrupt)
                staged_png = None
                if with_metadata:
                    staged_png = stack.enter_context(staged_file(target, "png"))
                    save_first_frame_png(images, staged_png, tags)
                video_path = publish(staged_video, target, fmt.extension)
                files = [video_path]
                if staged_png is not None:
                    files.insert(0, publish(staged_png, target, "png", counter_of(video_path, target)))
        shown = os.path.basename(os.path.dirname(video_path)) + "/" if fmt.kind == "images" else ""
        for note in result.notes:
            notice("Video Combine", f"{shown}{os.path.basename(video_path)}: {note}")

        def frames_as_written() -> torch.Tensor:
            order = list(frame_order(images.shape[0], pingpong))[: result.frame_count]
            return images if len(order) == images.shape[0] else images[torch.tensor(order)]

        video = video_value(video_path, frame_rate=result.frame_rate, width=result.width, height=result.height,
                            frame_count=result.frame_count, frames=None if fmt.video_from_file else frames_as_written)
        if fmt.kind == "images":
            subfolder = "/".join(p for p in (target.subfolder, os.path.basename(folder)) if p)
            ui = {"images": [{"filename": os.path.basename(video_path), "subfolder": subfolder,
                              "type": target.folder_type}], "animated": (False,)}
        else:
            ui = {"images": [ui_file(video_path, target)], "animated": (True,)}
        return {"ui": ui, "result": (files, video)}

    @staticmethod
    def _frames(images: torch.Tensor | None, latent: dict | None, vae: Any, decode_chunk: int) -> torch.Tensor:
        """The IMAGE to encode: `images`, or `latent` decoded through `vae` in chunks into a disk spool."""
        if images is not None and latent is not None:
            raise ValueError("Video Combine got both images and latent; connect one of them (latent needs vae).")
        if images is not None:
            return images
        if latent is None:
            raise ValueError("Video Combine has nothing to encode: connect images, or latent together with vae.")
        if vae is None:
            raise ValueError("Video Combine's latent input needs the vae input too (the VAE that made the latent), "
                             "to decode it; or decode it yourself and connect images.")
        count, chunks = decode_latent_chunks(vae, latent, decode_chunk)
        bar = ProgressBar(count)
        spool = FrameSpool()
        try:
            for index, chunk in enumerate(chunks):
                check_interrupt()
                spool.append(chunk)
                del chunk
                bar.update_absolute(index + 1, count)
            return spool.frames()
        finally:
            spool.close()
