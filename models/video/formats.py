"""Output formats as data: what container, which encoder, which options, and what each one can hold.

Adding a format means adding one VideoFormat below; the command builder (command.py) reads these
fields and nothing else about the format. Defaults follow the well-known Video Combine node's
format files (h264 crf 19, h265 crf 22 in 10 bit, vp9 crf 20, av1 crf 23 in 10 bit) so people get
the files they expect.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

# Pixel formats a user can pick. "auto" means the format's default (first of its pix_fmts,
# or its alpha_pix_fmt when the frames carry alpha).
PIX_FMT_CHOICES = ("auto", "yuv420p", "yuv420p10le", "yuv444p", "yuv444p10le", "yuva420p", "yuv422p10le",
                   "yuva444p10le", "gbrp16le", "gbrap16le")
# Chroma-subsampled layouts store one colour sample per 2×2 (or 2×1) block: odd sizes cannot be encoded.
_EVEN_SIZE_PREFIXES = ("yuv420", "yuva420", "yuv422", "yuva422", "nv12", "p010")


class EncoderSet(Protocol):
    """What formats need to know of an ffmpeg build (ffmpeg.FFmpeg satisfies it)."""

    encoders: frozenset[str]
    muxers: frozenset[str]


@dataclass(frozen=True)
class Encoder:
    """One ffmpeg encoder that can produce a format's codec, with the arguments it needs."""

    name: str                                   # ffmpeg encoder name, e.g. "libx264"
    args: tuple[str, ...] = ()                  # always passed after -c:v <name>
    crf_range: tuple[int, int] | None = None    # accepted -crf values; None = no crf option
    env: tuple[tuple[str, str], ...] = ()       # environment for ffmpeg (quiets chatty libraries)
    crf_flag: str = "-crf"                      # the option that carries crf (nvenc calls it -cq)
    # Needs a device beside ffmpeg (a GPU and its driver): listed by `-encoders` even where it cannot
    # run, so ffmpeg.py tries it on one frame before the format is offered.
    hardware: bool = False


@dataclass(frozen=True)
class VideoFormat:
    """One entry of the node's `format` list."""

    name: str                                   # what the user picks, e.g. "video/h264-mp4"
    extension: str                              # file extension without the dot
    muxer: str                                  # ffmpeg -f value
    encoders: tuple[Encoder, ...]               # in order of preference; the first the build has is used
    # gif: palette passes; webp: lossless/quality; video: crf/pix_fmt; images: numbered PNGs in a folder
    kind: Literal["gif", "webp", "video", "images"]
    pix_fmts: tuple[str, ...] = ()              # allowed pix_fmt choices, first = default
    alpha_pix_fmt: str | None = None            # used for RGBA frames when pix_fmt is auto; None = flatten alpha
    crf_default: int | None = None
    audio_encoders: tuple[str, ...] = ()        # first available is used; empty = cannot carry audio
    audio_args: tuple[str, ...] = ()
    container_loop: bool = False                # the file has a loop counter (gif, webp); else frames repeat
    container_metadata: bool = False            # can carry the workflow/prompt as container tags
    movflags: tuple[str, ...] = ()              # mp4 flags (faststart moves the index first for web playback)
    # Whether ComfyUI's VIDEO can be the file itself: its PyAV reader must decode it and core SaveVideo must
    # be able to copy its streams into mp4. Animated WebP fails the first, GIF, ProRes and ffv1 the second.
    video_from_file: bool = True
    notes: str = ""                             # one line for the help text
    input_depth: int = 8                        # bits per channel sent to ffmpeg (16 for 10/16-bit outputs)

    def encoder_for(self, build: EncoderSet) -> Encoder | None:
        """The first of this format's encoders that the ffmpeg build has, or None."""
        if self.muxer not in build.muxers:
            return None
        unusable = dict(getattr(build, "unusable", ()))
        return next((e for e in self.encoders if e.name in build.encoders and e.name not in unusable), None)

    def audio_encoder_for(self, build: EncoderSet) -> str | None:
        return next((a for a in self.audio_encoders if a in build.encoders), None)

    def missing_reason(self, build: EncoderSet) -> str | None:
        """Why this build cannot write the format, in words a user can act on; None if it can."""
        if self.muxer not in build.muxers:
            return f"{self.name}: this ffmpeg cannot write .{self.extension} files (no '{self.muxer}' muxer)"
        if self.encoder_for(build) is None:
            unusable = dict(getattr(build, "unusable", ()))
            tried = [f"{e.name} ({unusable[e.name]})" for e in self.encoders if e.name in unusable]
            if tried:
                return f"{self.name}: this ffmpeg has {', '.join(tried)} but it cannot run here"
            names = " or ".join(e.name for e in self.encoders)
            return f"{self.name}: this ffmpeg has no {names} encoder"
        return None

    def default_crf(self, encoder: Encoder) -> int | None:
        return self.crf_default if encoder.crf_range is not None else None

    def resolve_pix_fmt(self, choice: str, has_alpha: bool) -> str | None:
        """The pix_fmt ffmpeg should produce; None lets the encoder pick (gif, webp)."""
        if not self.pix_fmts:
            return None
        if choice == "auto":
            return self.alpha_pix_fmt if has_alpha and self.alpha_pix_fmt else self.pix_fmts[0]
        return choice

    def keeps_alpha(self, pix_fmt: str | None) -> bool:
        """Whether RGBA frames keep their alpha channel in this format with this pix_fmt."""
        if self.kind in ("webp", "images"):
            return True
        return pix_fmt is not None and pix_fmt == self.alpha_pix_fmt


def needs_even_size(pix_fmt: str | None) -> bool:
    return pix_fmt is not None and pix_fmt.startswith(_EVEN_SIZE_PREFIXES)


_X264 = Encoder("libx264", ("-preset", "medium"), (0, 51))
_X265 = Encoder("libx265", ("-preset", "medium", "-x265-params", "log-level=error", "-tag:v", "hvc1"), (0, 51))
# cpu-used 4 + row-mt: about 3× faster than libvpx's default (cpu-used 0) at a small size cost.
_VP9 = Encoder("libvpx-vp9", ("-b:v", "0", "-deadline", "good", "-cpu-used", "4", "-row-mt", "1"), (0, 63))
_SVTAV1 = Encoder("libsvtav1", ("-preset", "8"), (1, 63), env=(("SVT_LOG", "1"),))
_AOMAV1 = Encoder("libaom-av1", ("-b:v", "0", "-cpu-used", "6", "-row-mt", "1"), (0, 63))
# NVENC: constant-quality VBR (-cq is its crf); preset p5 is its "slow, good" middle.
_NVENC_H264 = Encoder("h264_nvenc", ("-preset", "p5", "-rc", "vbr", "-b:v", "0"), (0, 51), crf_flag="-cq",
                      hardware=True)
_NVENC_HEVC = Encoder("hevc_nvenc", ("-preset", "p5", "-rc", "vbr", "-b:v", "0", "-tag:v", "hvc1"), (0, 51),
                      crf_flag="-cq", hardware=True)
# prores_ks picks its profile from the pix_fmt (auto): 422 HQ for yuv422p10le, 4444 for yuva444p10le.
_PRORES = Encoder("prores_ks", ("-vendor", "apl0"))
_FFV1 = Encoder("ffv1", ("-level", "3", "-g", "1", "-slicecrc", "1"))
_PNG = Encoder("png")

_MP4_AUDIO = {"audio_encoders": ("aac",), "audio_args": ("-b:a", "192k")}
_WEBM_AUDIO = {"audio_encoders": ("libopus", "libvorbis")}
_VP9_WEBM = VideoFormat("video/webm", "webm", "webm", (_VP9,), "video",
                        pix_fmts=("yuv420p", "yuva420p", "yuv444p", "yuv420p10le"), alpha_pix_fmt="yuva420p",
                        crf_default=20, container_metadata=True, notes="VP9; keeps alpha (yuva420p)", **_WEBM_AUDIO)
_PNG_SEQUENCE = VideoFormat("image/png", "png", "image2", (_PNG,), "images", video_from_file=False,
                            notes="a folder of numbered 8-bit PNGs (alpha kept); the first carries the workflow")

FORMATS: tuple[VideoFormat, ...] = (
    VideoFormat("image/gif", "gif", "gif", (Encoder("gif"),), "gif", container_loop=True, video_from_file=False,
                notes="256 colours from one palette for the whole clip; no audio, no alpha"),
    VideoFormat("image/webp", "webp", "webp", (Encoder("libwebp_anim"),), "webp", container_loop=True,
                video_from_file=False, notes="animated WebP; keeps alpha; lossless or quality 0-100"),
    VideoFormat("video/h264-mp4", "mp4", "mp4", (_X264,), "video", pix_fmts=("yuv420p", "yuv420p10le", "yuv444p"),
                crf_default=19, container_metadata=True, movflags=("faststart",), notes="plays everywhere",
                **_MP4_AUDIO),
    VideoFormat("video/h265-mp4", "mp4", "mp4", (_X265,), "video",
                pix_fmts=("yuv420p10le", "yuv420p", "yuv444p", "yuv444p10le"), crf_default=22,
                container_metadata=True, movflags=("faststart",), notes="smaller than h264 at the same quality",
                **_MP4_AUDIO),
    _VP9_WEBM,
    replace(_VP9_WEBM, name="video/vp9-webm", notes="the same as video/webm (its earlier name)"),
    VideoFormat("video/av1-webm", "webm", "webm", (_SVTAV1, _AOMAV1), "video", pix_fmts=("yuv420p10le", "yuv420p"),
                crf_default=23, container_metadata=True, notes="smallest files; slower to encode", **_WEBM_AUDIO),
    VideoFormat("video/ProRes", "mov", "mov", (_PRORES,), "video", pix_fmts=("yuv422p10le", "yuva444p10le"),
                alpha_pix_fmt="yuva444p10le", audio_encoders=("pcm_s16le",), container_metadata=True,
                input_depth=16, video_from_file=False, notes="ProRes 422 HQ in .mov for editing (4444 with alpha); 10-bit; big files"),
    VideoFormat("video/ffv1-mkv", "mkv", "matroska", (_FFV1,), "video", pix_fmts=("gbrp16le", "gbrap16le"),
                alpha_pix_fmt="gbrap16le", audio_encoders=("flac", "pcm_s16le"), container_metadata=True,
                input_depth=16, video_from_file=False, notes="lossless 16-bit RGB (alpha kept) in .mkv, for archiving and post work"),
    VideoFormat("video/nvenc_h264-mp4", "mp4", "mp4", (_NVENC_H264,), "video", pix_fmts=("yuv420p", "yuv444p"),
                crf_default=19, container_metadata=True, movflags=("faststart",),
                notes="h264 on an NVIDIA GPU's encoder (fast)", **_MP4_AUDIO),
    VideoFormat("video/nvenc_hevc-mp4", "mp4", "mp4", (_NVENC_HEVC,), "video", pix_fmts=("yuv420p", "yuv444p"),
                crf_default=22, container_metadata=True, movflags=("faststart",),
                notes="h265 on an NVIDIA GPU's encoder (fast)", **_MP4_AUDIO),
    _PNG_SEQUENCE,
    replace(_PNG_SEQUENCE, name="video/8bit-png", notes="the same as image/png"),
    VideoFormat("video/16bit-png", "png", "image2", (_PNG,), "images", video_from_file=False, input_depth=16,
                notes="a folder of numbered 16-bit PNGs (alpha kept); the first carries the workflow"),
)

FORMATS_BY_NAME: dict[str, VideoFormat] = {f.name: f for f in FORMATS}


def get_format(name: str) -> VideoFormat:
    try:
        return FORMATS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"Unknown format '{name}'. Known formats: {', '.join(FORMATS_BY_NAME)}.") from None


def available_formats(build: EncoderSet | None) -> list[VideoFormat]:
    return [] if build is None else [f for f in FORMATS if f.encoder_for(build) is not None]


def missing_formats(build: EncoderSet | None) -> dict[str, str]:
    """Format name -> why this build cannot write it."""
    if build is None:
        return {f.name: f"{f.name}: no ffmpeg found" for f in FORMATS}
    return {f.name: r for f in FORMATS if (r := f.missing_reason(build)) is not None}


# The node inputs that only some formats have. Each format's entry in format_widgets() names which of
# these it uses; the node's frontend extension shows exactly those, and the encoder ignores the others.
FORMAT_WIDGETS = ("loop_count", "crf", "pix_fmt", "lossless", "quality", "trim_to_audio")


def format_widgets(fmt: VideoFormat, encoder: Encoder | None = None) -> dict[str, dict[str, object]]:
    """The format-specific inputs `fmt` has, each with the values it accepts (empty dict: any value).

    The one table both sides read: the frontend shows these inputs and limits crf and pix_fmt to the ranges
    given here; check_choice() and ignored_options() use it to decide what is refused and what is ignored.
    `encoder` is the one the ffmpeg build will use (crf ranges differ: SVT-AV1 starts at 1); without it the
    format's first encoder is assumed.
    """
    encoder = encoder or fmt.encoders[0]
    has: dict[str, dict[str, object]] = {}
    if fmt.kind != "images":                       # png sequences have no loop and no repeats
        has["loop_count"] = {}
    if encoder.crf_range is not None:
        lo, hi = encoder.crf_range
        has["crf"] = {"min": lo, "max": hi, "default": -1, "format_default": fmt.crf_default}
    if fmt.pix_fmts:
        has["pix_fmt"] = {"values": ["auto", *fmt.pix_fmts], "default": "auto"}
    if fmt.kind == "webp":
        has["lossless"] = {}
        has["quality"] = {}
    if fmt.audio_encoders:                         # only formats that carry sound can be cut to it
        has["trim_to_audio"] = {}
    return has


def widget_table(build: EncoderSet | None) -> dict[str, object]:
    """{"widgets": FORMAT_WIDGETS, "formats": {name: format_widgets(...)}} for every known format.

    Every format is listed, not only those this ffmpeg can write, so a saved workflow naming a missing
    format still shows its inputs.
    """
    formats = {f.name: format_widgets(f, f.encoder_for(build) if build is not None else None) for f in FORMATS}
    return {"widgets": list(FORMAT_WIDGETS), "formats": formats}


def ignored_options(name: str, pix_fmt: str, crf: int, build: EncoderSet) -> list[str]:
    """The options set away from their default that this format does not have (for a note on the node)."""
    fmt = FORMATS_BY_NAME[name]
    has = format_widgets(fmt, fmt.encoder_for(build))
    ignored = []
    if pix_fmt != "auto" and "pix_fmt" not in has:
        ignored.append(f"pix_fmt {pix_fmt}")
    if crf != -1 and "crf" not in has:
        ignored.append(f"crf {crf}")
    return ignored


def check_choice(name: str, pix_fmt: str, crf: int, build: EncoderSet | None,
                 encoder_pix_fmts: Iterable[str] | None = None) -> str | None:
    """Why this combination of format, pix_fmt and crf cannot be written, or None if it can.

    Used both when ComfyUI validates the prompt (before a long generation starts) and at run time.
    """
    fmt = FORMATS_BY_NAME.get(name)
    if fmt is None:
        return f"unknown format '{name}'; choose one of {', '.join(FORMATS_BY_NAME)}"
    if build is None:
        return f"{name} needs ffmpeg, and none was found (see the format tooltip for where we looked)"
    reason = fmt.missing_reason(build)
    if reason is not None:
        usable = ", ".join(f.name for f in available_formats(build)) or "none"
        return f"{reason}; formats this ffmpeg can write: {usable}"
    encoder = fmt.encoder_for(build)
    assert encoder is not None
    if pix_fmt not in PIX_FMT_CHOICES:
        return f"pix_fmt '{pix_fmt}' is not one of {', '.join(PIX_FMT_CHOICES)}"
    # An option the format does not have (pix_fmt for gif, crf for ProRes) is ignored, not refused: the
    # widget keeps its value when the user switches formats, and that must not break the next run.
    has = format_widgets(fmt, encoder)
    if pix_fmt != "auto" and "pix_fmt" in has:
        if pix_fmt not in fmt.pix_fmts:
            return f"{name} supports pix_fmt {', '.join(fmt.pix_fmts)} (or auto), not '{pix_fmt}'"
        if encoder_pix_fmts is not None and pix_fmt not in set(encoder_pix_fmts):
            return f"this ffmpeg's {encoder.name} cannot encode pix_fmt '{pix_fmt}'"
    if crf != -1 and "crf" in has and encoder.crf_range is not None:
        lo, hi = encoder.crf_range
        if not lo <= crf <= hi:
            return f"crf {crf} is outside {lo}..{hi} for {encoder.name} (or use -1 for the default {fmt.crf_default})"
    return None
