"""Encode an IMAGE batch (plus optional AUDIO) into one file, streaming frames into ffmpeg.

The caller names the file to write (normally a staged temporary name that it publishes after
success); on any failure that file is removed. Progress and interruption come in as callbacks
so this module runs in any process, with or without ComfyUI.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from . import command
from .audio import audio_length, write_raw_audio
from .ffmpeg import FFmpeg, encoder_pix_fmts, find_ffmpeg
from .formats import Encoder, VideoFormat, check_choice, get_format, ignored_options, needs_even_size
from .frames import FrameCheck, FrameConverter, check_frames, even_sample, frame_order, order_length
from .metadata import add_png_text, container_tags, write_ffmetadata
from .process import FFmpegError, run_ffmpeg

ProgressFn = Callable[[int, int], None]

# ffmpeg's palettegen keeps a histogram of every distinct colour it is shown. On 81 frames of 480p
# video that took ~600 MB and ~100 s here; a palette from an even sample of about this many pixels
# dithers to the same error (measured) in about a second.
PALETTE_SAMPLE_PIXELS = 1_600_000

SCRATCH_PREFIX = "slipstream-video-"
STALE_SCRATCH_S = 24 * 3600
_scratch_swept = False


def sweep_stale_scratch(root: str | None = None, older_than_s: float = STALE_SCRATCH_S) -> list[str]:
    """Remove '<tmp>/slipstream-video-*' folders older than a day; return them.

    Each encode removes its own scratch folder, but a process killed mid-encode (SIGKILL, power loss)
    cannot; a day is far longer than any encode, so a folder that old belongs to no running one.
    """
    root = root or tempfile.gettempdir()
    cutoff = time.time() - older_than_s
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(root, name)
        try:
            if (name.startswith(SCRATCH_PREFIX) and os.path.isdir(path) and not os.path.islink(path)
                    and os.path.getmtime(path) < cutoff):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        except OSError:
            continue
    return removed


def _sweep_scratch_once() -> None:
    global _scratch_swept
    if not _scratch_swept:
        _scratch_swept = True
        sweep_stale_scratch()


@dataclass(frozen=True)
class EncodeSettings:
    """The user's choices, as the node's widgets name them."""

    format: str
    frame_rate: float
    loop_count: int = 0
    pingpong: bool = False
    crf: int = -1                 # -1 = the format's default
    pix_fmt: str = "auto"
    lossless: bool = False        # image/webp only
    quality: int = 90             # image/webp only
    metadata: Mapping[str, str] = field(default_factory=dict)   # container tags / first PNG's text chunks
    trim_to_audio: bool = False   # cut the video to the sound's length when the sound is shorter


@dataclass(frozen=True)
class EncodeResult:
    """What was written, for the UI, the VIDEO value and the user's log."""

    path: str
    format: str
    encoder: str
    pix_fmt: str | None
    width: int
    height: int
    frame_count: int
    frame_rate: Fraction
    has_audio: bool
    notes: tuple[str, ...]


def check_settings(settings: EncodeSettings) -> None:
    rate = settings.frame_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"frame_rate must be a number above 0 (frames per second), got {rate!r}. "
                         "Wan 2.1 makes 16 fps video.")
    if settings.loop_count < 0:
        raise ValueError(f"loop_count must be 0 (loop forever / play once) or more, got {settings.loop_count}.")
    if not 0 <= settings.quality <= 100:
        raise ValueError(f"quality must be within 0..100, got {settings.quality}.")


def _frames(images: torch.Tensor, converter: FrameConverter, order: Iterator[int]) -> Iterator[np.ndarray]:
    for index in order:
        yield converter.convert(images[index])


def palette_sample(count: int, height: int, width: int) -> tuple[list[int], int]:
    """(frame indices, pixel step) to build a GIF palette from, within PALETTE_SAMPLE_PIXELS."""
    step = 2 if height * width >= 4 * 256 * 256 else 1
    per_frame = max(1, (height // step) * (width // step))
    return even_sample(count, max(1, PALETTE_SAMPLE_PIXELS // per_frame)), step


def _notes(check: FrameCheck, converter: FrameConverter, settings: EncodeSettings, pix_fmt: str | None,
           audio_ignored: bool) -> list[str]:
    notes = []
    if converter.padded:
        notes.append(f"frames are {check.width}×{check.height}; {pix_fmt} needs even sizes, so they were padded to "
                     f"{converter.out_width}×{converter.out_height} by repeating the last column/row")
    if check.has_alpha and not converter.keep_alpha:
        notes.append(f"{settings.format} with pix_fmt {pix_fmt or 'auto'} has no alpha channel: "
                     "transparent areas were flattened onto black")
    if check.out_of_range_frames:
        notes.append(f"{check.out_of_range_frames} frame(s) had values outside 0..1; they were clamped")
    if settings.pingpong and check.count < 3:
        notes.append(f"pingpong needs 3 or more frames to add any; {check.count} frame(s) were written as they are")
    if audio_ignored:
        notes.append(f"{settings.format} cannot carry sound; the audio input was not used")
    return notes


def _crf(fmt: VideoFormat, encoder: Encoder, crf: int) -> int | None:
    if encoder.crf_range is None:
        return None                       # the format has no crf (ProRes, ffv1, gif, ...): ignored
    return fmt.default_crf(encoder) if crf == -1 else crf


def frames_for_audio(audio: Mapping[str, Any], frame_rate: Fraction) -> int:
    """How many frames the sound covers: ceil(seconds × rate), at least 1 (the last frame may run past it)."""
    samples, sample_rate = audio_length(audio)
    return max(1, math.ceil(Fraction(samples) * frame_rate / sample_rate))


def _remove_output(path: str, is_folder: bool) -> None:
    """Remove what a failed encode left under `path` (a file, or a png sequence's folder's frames)."""
    if is_folder:
        for name in os.listdir(path) if os.path.isdir(path) else ():
            os.unlink(os.path.join(path, name))
    elif os.path.exists(path):
        os.unlink(path)


def _finish_sequence(folder: str, total: int, tags: Mapping[str, str], build: FFmpeg, what: str) -> None:
    """Check a png sequence is complete (one file per frame) and put the workflow into its first frame."""
    written = sorted(os.listdir(folder))
    expected = [command.sequence_name(i) for i in range(1, total + 1)]
    if written != expected:
        raise FFmpegError(f"ffmpeg ({build.describe()}) wrote {len(written)} file(s) for {what}, expected {total} "
                          f"({expected[0]} to {expected[-1]}); nothing was saved.")
    if tags:
        add_png_text(os.path.join(folder, expected[0]), tags)


def encode_frames(images: torch.Tensor, settings: EncodeSettings, out_path: str, *,
                  audio: Mapping[str, Any] | None = None, ffmpeg: FFmpeg | None = None,
                  progress: ProgressFn | None = None,
                  check_interrupt: Callable[[], None] | None = None) -> EncodeResult:
    """Write `images` [B,H,W,C] to `out_path` in `settings.format`; the file is removed if anything fails.

    For the png sequences (kind "images") `out_path` is an existing empty folder that receives
    00001.png, 00002.png, ...; on failure the frames in it are removed (the folder is the caller's).
    """
    check_settings(settings)
    fmt = get_format(settings.format)
    build = ffmpeg or find_ffmpeg()
    encoder = fmt.encoder_for(build)
    pix_fmts = encoder_pix_fmts(build.path, encoder.name) if encoder and settings.pix_fmt != "auto" else None
    problem = check_choice(settings.format, settings.pix_fmt, settings.crf, build, pix_fmts)
    if problem is not None:
        raise ValueError(problem)
    assert encoder is not None
    check = check_frames(images, check_interrupt)

    pix_fmt = fmt.resolve_pix_fmt(settings.pix_fmt, check.has_alpha)
    converter = FrameConverter(check.height, check.width, check.channels, keep_alpha=fmt.keeps_alpha(pix_fmt),
                               pad_to_even=needs_even_size(pix_fmt), depth=fmt.input_depth)
    repeats = 1 if fmt.container_loop or fmt.kind == "images" else settings.loop_count + 1
    total = order_length(check.count, settings.pingpong, repeats)
    frame_rate = command.frame_rate_fraction(settings.frame_rate)
    audio_encoder = fmt.audio_encoder_for(build) if audio is not None else None
    if audio is not None and fmt.audio_encoders and audio_encoder is None:
        raise ValueError(f"this ffmpeg ({build.describe()}) has none of the audio encoders {fmt.name} uses "
                         f"({', '.join(fmt.audio_encoders)}); remove the audio input or use another ffmpeg.")
    notes = _notes(check, converter, settings, pix_fmt, audio_ignored=audio is not None and audio_encoder is None)
    if ignored := ignored_options(fmt.name, settings.pix_fmt, settings.crf, build):
        notes.append(f"{fmt.name} has no {' or '.join(o.split()[0] for o in ignored)} option; "
                     f"{', '.join(ignored)} was not used")
    if settings.trim_to_audio and audio_encoder is not None:
        sound_frames = frames_for_audio(audio, frame_rate)
        if sound_frames < total:
            notes.append(f"trim_to_audio: the sound lasts {sound_frames} frame(s); the video was cut from {total}")
            total = sound_frames
    palette_frames, pixel_step = palette_sample(check.count, check.height, check.width)
    steps = total + (len(palette_frames) if fmt.kind == "gif" else 0)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)

    env = dict(encoder.env)
    what = f"{fmt.name} ({os.path.basename(out_path)})"
    try:
        _sweep_scratch_once()
        with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX) as scratch:
            raw_audio = None
            if audio_encoder is not None:
                raw_audio = write_raw_audio(audio, total / float(frame_rate), os.path.join(scratch, "audio.f32"))
                notes.extend(raw_audio.notes)
            metadata_path = None
            if fmt.container_metadata and settings.metadata:
                metadata_path = os.path.join(scratch, "metadata.txt")
                write_ffmetadata(metadata_path, container_tags(settings.metadata))
            job = command.Job(
                ffmpeg=build.path, format=fmt, encoder=encoder, width=converter.out_width,
                height=converter.out_height, input_pix_fmt=converter.pix_fmt, frame_rate=frame_rate,
                pix_fmt=pix_fmt, crf=_crf(fmt, encoder, settings.crf),
                loop_count=settings.loop_count, lossless=settings.lossless, quality=settings.quality,
                audio=raw_audio, audio_encoder=audio_encoder, metadata_path=metadata_path)
            palette = None
            if fmt.kind == "gif":
                palette = os.path.join(scratch, "palette.png")
                run_ffmpeg(command.palette_command(job, palette, pixel_step),
                           _frames(images, converter, iter(palette_frames)),
                           what=f"the GIF palette for {what}", env=env, on_frame=step,
                           check_interrupt=check_interrupt)
            order = itertools.islice(frame_order(check.count, settings.pingpong, repeats), total)
            run_ffmpeg(command.encode_command(job, out_path, palette), _frames(images, converter, order),
                       what=what, env=env, on_frame=step, check_interrupt=check_interrupt)
        if fmt.kind == "images":
            _finish_sequence(out_path, total, settings.metadata, build, what)
    except BaseException:
        _remove_output(out_path, fmt.kind == "images")
        raise
    if not os.path.exists(out_path) or (fmt.kind != "images" and os.path.getsize(out_path) == 0):
        _remove_output(out_path, fmt.kind == "images")
        raise FFmpegError(f"ffmpeg ({build.describe()}) reported success but wrote nothing for {what}")
    return EncodeResult(out_path, fmt.name, encoder.name, pix_fmt, converter.out_width, converter.out_height,
                        total, frame_rate, raw_audio is not None, tuple(notes))
