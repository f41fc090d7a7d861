"""Find the ffmpeg binary to use and learn what it can encode.

Order: the SLIPSTREAM_FFMPEG environment variable wins and is used as given (an
error if it does not run). Otherwise the candidates are imageio-ffmpeg's binary (a dependency of
the pack, so usually present) and `ffmpeg` on PATH; when both run, the one that can write more of
our formats wins, then the newer build, then imageio-ffmpeg. Probing runs `ffmpeg -encoders` and
`-muxers` once per binary (cached by path, size and mtime), so the node can list exactly the
formats the build can write.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .formats import FORMATS, available_formats

ENV_VAR = "SLIPSTREAM_FFMPEG"
_PROBE_TIMEOUT_S = 20


class FFmpegNotFoundError(RuntimeError):
    """No usable ffmpeg binary; the message lists where we looked and how to fix it."""


@dataclass(frozen=True)
class FFmpeg:
    """A probed ffmpeg binary."""

    path: str
    source: str                  # "SLIPSTREAM_FFMPEG", "imageio-ffmpeg" or "PATH"
    version: str                 # e.g. "n7.0.2" or "6.1.1-3ubuntu5"
    year: int                    # copyright year of the build (0 if unknown), a proxy for age
    encoders: frozenset[str]
    muxers: frozenset[str]
    # Listed hardware encoders that failed a one-frame try, with ffmpeg's reason (no GPU, no driver).
    unusable: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        return f"ffmpeg {self.version} from {self.source} ({self.path})"


_ENCODER_LINE = re.compile(r"^\s*[VAS][\w.]{5}\s+(\S+)")
_MUXER_LINE = re.compile(r"^\s*[D ]?E[ d]?\s+(\S+)")


def _run(path: str, *args: str) -> str:
    done = subprocess.run([path, "-hide_banner", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=_PROBE_TIMEOUT_S, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).decode("utf-8", "replace").strip().splitlines()[-3:]
        raise OSError(f"'{path} {' '.join(args)}' exited with code {done.returncode}: {' | '.join(tail)}")
    return done.stdout.decode("utf-8", "replace")


def _listed_names(text: str, is_rule: Callable[[str], bool], line: re.Pattern) -> Iterator[str]:
    """The first field of each entry in an `ffmpeg -encoders`/`-muxers` listing (entries follow a rule line)."""
    started = False
    for row in text.splitlines():
        if is_rule(row.strip()):
            started = True
        elif started and (m := line.match(row)):
            yield m.group(1)


def _parse_encoders(text: str) -> frozenset[str]:
    return frozenset(_listed_names(text, lambda row: row.startswith("------"), _ENCODER_LINE))


def _parse_muxers(text: str) -> frozenset[str]:
    # A muxer entry may name several formats at once ("mov,mp4,m4a,...").
    return frozenset(name for names in _listed_names(text, lambda row: row == "---", _MUXER_LINE)
                     for name in names.split(","))


_HARDWARE_TRY_SIZE = 256      # NVENC refuses frames below about 145×49; 256² is accepted everywhere
_HARDWARE_TRY_TIMEOUT_S = 5   # a working encoder takes well under a second for one frame


def _hardware_problem(path: str, encoder: str) -> str | None:
    """Encode one black frame with a hardware encoder: None if it works, else ffmpeg's reason in a line.

    `ffmpeg -encoders` lists every encoder the build was compiled with, including NVENC on machines
    with no NVIDIA GPU; offering such a format would only fail when the node runs.
    """
    size = _HARDWARE_TRY_SIZE
    try:
        done = subprocess.run([path, "-hide_banner", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
                               "-s", f"{size}x{size}", "-i", "-", "-frames:v", "1", "-c:v", encoder, "-f", "null",
                               "-"], input=bytes(size * size * 3), capture_output=True, timeout=_HARDWARE_TRY_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    line = lines[0] if lines else f"exit code {done.returncode}"
    return re.sub(r"^\[[^\]]*\]\s*", "", line)


_HARDWARE_ENCODERS = tuple(dict.fromkeys(e.name for f in FORMATS for e in f.encoders if e.hardware))


@functools.lru_cache(maxsize=16)
def _probe_cached(path: str, source: str, _stamp: tuple[int, int]) -> FFmpeg:
    version_text = _run(path, "-version")
    first = version_text.splitlines()[0] if version_text else ""
    version = m.group(1) if (m := re.search(r"ffmpeg version (\S+)", first)) else "unknown"
    year = int(m.group(1)) if (m := re.search(r"Copyright \(c\) \d{4}-(\d{4})", first)) else 0
    encoders = _parse_encoders(_run(path, "-encoders"))
    unusable = tuple((name, why) for name in _HARDWARE_ENCODERS if name in encoders
                     and (why := _hardware_problem(path, name)) is not None)
    return FFmpeg(path, source, version, year, encoders, _parse_muxers(_run(path, "-muxers")), unusable)


def probe(path: str, source: str = "given path") -> FFmpeg:
    """Run the binary to learn its version, encoders and muxers; OSError if it does not run."""
    st = os.stat(path)
    return _probe_cached(os.path.abspath(path), source, (st.st_size, st.st_mtime_ns))


def _imageio_ffmpeg_path() -> tuple[str | None, str]:
    try:
        import imageio_ffmpeg
    except ImportError:
        return None, "imageio-ffmpeg is not installed (pip install imageio-ffmpeg)"
    try:
        return imageio_ffmpeg.get_ffmpeg_exe(), ""
    except RuntimeError as exc:
        return None, f"imageio-ffmpeg has no binary for this platform ({exc})"


def _score(build: FFmpeg) -> tuple[int, int]:
    return len(available_formats(build)), build.year


def find_ffmpeg() -> FFmpeg:
    """The ffmpeg to use (see the module docstring for the order); FFmpegNotFoundError if none runs."""
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        path = shutil.which(forced) or forced
        try:
            return probe(path, ENV_VAR)
        except (OSError, subprocess.SubprocessError) as exc:
            raise FFmpegNotFoundError(f"{ENV_VAR}={forced} is not a working ffmpeg: {exc}. "
                                      f"Point it at an ffmpeg executable or unset it.") from exc
    tried: list[str] = []
    found: list[FFmpeg] = []
    imageio_path, why = _imageio_ffmpeg_path()
    candidates = [(imageio_path, "imageio-ffmpeg")] if imageio_path else []
    if why:
        tried.append(why)
    on_path = shutil.which("ffmpeg")
    if on_path:
        candidates.append((on_path, "PATH"))
    else:
        tried.append("no 'ffmpeg' on PATH")
    for path, source in candidates:
        if any(os.path.realpath(f.path) == os.path.realpath(path) for f in found):
            continue
        try:
            found.append(probe(path, source))
        except (OSError, subprocess.SubprocessError) as exc:
            tried.append(f"{source} {path} does not run: {exc}")
    if not found:
        raise FFmpegNotFoundError(
            "No usable ffmpeg found (" + "; ".join(tried) + "). Install imageio-ffmpeg (pip install imageio-ffmpeg), "
            f"put ffmpeg on PATH, or set {ENV_VAR} to an ffmpeg executable.")
    # max() keeps the first of equals, so imageio-ffmpeg wins ties.
    return max(found, key=_score)


def find_ffmpeg_or_none() -> tuple[FFmpeg | None, str]:
    """(ffmpeg, "") or (None, why) — for listing formats without raising."""
    try:
        return find_ffmpeg(), ""
    except FFmpegNotFoundError as exc:
        return None, str(exc)


@functools.lru_cache(maxsize=32)
def encoder_pix_fmts(path: str, encoder: str) -> frozenset[str] | None:
    """Pixel formats an encoder of this binary accepts, or None if ffmpeg does not say."""
    try:
        text = _run(path, "-h", f"encoder={encoder}")
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"Supported pixel formats:\s*(.+)", text)
    return frozenset(m.group(1).split()) if m else None
