"""ffmpeg command lines built from a VideoFormat and the user's options.

Frames always arrive as raw RGB(A) bytes on stdin; what differs per format is read from the
format's data. GIF takes two passes over the frames (palettegen, then paletteuse) instead of
ffmpeg's usual split filter, because the split would hold every frame in ffmpeg's memory until
the palette is known.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

from .audio import RawAudio
from .formats import Encoder, VideoFormat

GIF_DITHER = "sierra2_4a"
# Frame files of the png sequences inside their folder: 00001.png, 00002.png, ...
SEQUENCE_PATTERN = "%05d.png"


def sequence_name(number: int) -> str:
    """The file name of frame `number` (1-based) of a png sequence."""
    return SEQUENCE_PATTERN % number


@dataclass(frozen=True)
class Job:
    """Everything one encode needs to know, resolved and checked."""

    ffmpeg: str
    format: VideoFormat
    encoder: Encoder
    width: int                   # of the frames sent (after padding)
    height: int
    input_pix_fmt: str           # "rgb24" or "rgba"
    frame_rate: Fraction
    pix_fmt: str | None          # output pix_fmt; None lets the encoder choose
    crf: int | None
    loop_count: int
    lossless: bool = False
    quality: int = 90
    audio: RawAudio | None = None
    audio_encoder: str | None = None
    metadata_path: str | None = None


def frame_rate_fraction(frame_rate: float) -> Fraction:
    """An exact rational for ffmpeg's -r (23.976 -> 2997/125; 16 -> 16)."""
    return Fraction(frame_rate).limit_denominator(1001)


def _raw_input(job: Job) -> list[str]:
    args = ["-f", "rawvideo", "-pix_fmt", job.input_pix_fmt, "-s", f"{job.width}x{job.height}",
            "-r", str(job.frame_rate)]
    if job.format.kind == "video":
        # Say what the bytes are (full-range sRGB) so the RGB->YUV conversion below is the standard one.
        args += ["-color_range", "pc", "-colorspace", "rgb", "-color_primaries", "bt709",
                 "-color_trc", "iec61966-2-1"]
    return [*args, "-i", "-"]


def _head(job: Job) -> list[str]:
    return [job.ffmpeg, "-hide_banner", "-v", "error", "-nostats"]


def palette_command(job: Job, palette_path: str, pixel_step: int = 1) -> list[str]:
    """Pass 1 of GIF: one 256-colour palette from the frames sent (every `pixel_step`-th pixel of each)."""
    sample = f"scale=trunc(iw/{pixel_step}):trunc(ih/{pixel_step}):flags=neighbor," if pixel_step > 1 else ""
    return [*_head(job), *_raw_input(job), "-vf", f"{sample}palettegen=stats_mode=full:reserve_transparent=0",
            "-update", "1", "-f", "image2", "-y", palette_path]


def _video_args(job: Job) -> list[str]:
    args = ["-map", "0:v:0", "-c:v", job.encoder.name, *job.encoder.args]
    if job.crf is not None:
        args += [job.encoder.crf_flag, str(job.crf)]
    if job.pix_fmt is not None:
        args += ["-pix_fmt", job.pix_fmt]
        if job.pix_fmt.startswith("yuv"):
            args += ["-vf", "scale=out_color_matrix=bt709:out_range=tv", "-color_range", "tv",
                     "-colorspace", "bt709", "-color_primaries", "bt709"]
    return args


def encode_command(job: Job, out_path: str, palette_path: str | None = None) -> list[str]:
    """The command that writes the final file (pass 2 for GIF); for png sequences `out_path` is the folder."""
    fmt = job.format
    cmd = [*_head(job), *_raw_input(job)]
    next_input = 1
    if fmt.kind == "gif":
        if palette_path is None:
            raise ValueError("GIF needs the palette from palette_command() first")
        cmd += ["-i", palette_path, "-filter_complex", f"[0:v][1:v]paletteuse=dither={GIF_DITHER}",
                "-loop", str(job.loop_count)]
    elif fmt.kind == "images":
        png_pix_fmt = {"rgb24": "rgb24", "rgba": "rgba", "rgb48le": "rgb48be", "rgba64le": "rgba64be"}
        cmd += ["-c:v", job.encoder.name, "-pix_fmt", png_pix_fmt[job.input_pix_fmt], "-start_number", "1"]
        return [*cmd, "-f", fmt.muxer, "-y", os.path.join(out_path, SEQUENCE_PATTERN)]
    elif fmt.kind == "webp":
        cmd += ["-c:v", job.encoder.name, "-lossless", "1" if job.lossless else "0",
                "-quality", str(job.quality), "-loop", str(job.loop_count)]
        if job.input_pix_fmt == "rgba":
            cmd += ["-pix_fmt", "bgra" if job.lossless else "yuva420p"]
    else:
        audio_index = None
        if job.audio is not None and job.audio_encoder is not None:
            cmd += ["-f", "f32le", "-ar", str(job.audio.sample_rate), "-ac", str(job.audio.channels),
                    "-i", job.audio.path]
            audio_index, next_input = next_input, next_input + 1
        if job.metadata_path is not None:
            cmd += ["-f", "ffmetadata", "-i", job.metadata_path]
        cmd += _video_args(job)
        if audio_index is not None:
            cmd += ["-map", f"{audio_index}:a:0", "-c:a", job.audio_encoder, *fmt.audio_args]
        if job.metadata_path is not None:
            cmd += ["-map_metadata", str(next_input)]
        movflags = list(fmt.movflags)
        if job.metadata_path and fmt.muxer in ("mp4", "mov"):
            movflags.append("use_metadata_tags")   # keep every tag (prompt, workflow), not only known ones
        if movflags:
            cmd += ["-movflags", "".join(f"+{flag}" for flag in movflags)]
    return [*cmd, "-f", fmt.muxer, "-y", out_path]
