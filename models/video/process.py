"""Run ffmpeg with frames streamed into its stdin, and turn every way it can fail into a clear error.

stderr is drained by a thread into a short ring buffer: without it a chatty ffmpeg could fill the
pipe and block while we block writing frames, and with it the error can quote ffmpeg's last lines.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import IO

import numpy as np

_TAIL_LINES = 12
_WAIT_POLL_S = 0.25


class FFmpegError(RuntimeError):
    """ffmpeg failed or died; the message carries its last output lines."""


def _drain(stream: IO[bytes], tail: collections.deque[str]) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            tail.append(line)


def _exit_words(returncode: int | None) -> str:
    if returncode is None:
        return "did not finish"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (out of memory, or stopped by another program?)"
    return f"exited with code {returncode}"


def _short_command(argv: list[str]) -> str:
    return " ".join(a if len(a) <= 80 else a[:77] + "..." for a in argv)


def run_ffmpeg(argv: list[str], frames: Iterable[np.ndarray], *, what: str,
               env: Mapping[str, str] | None = None, on_frame: Callable[[], None] | None = None,
               check_interrupt: Callable[[], None] | None = None) -> None:
    """Write each frame's bytes to ffmpeg's stdin and wait for it; FFmpegError if it does not succeed.

    `check_interrupt` is called before every frame and while waiting for ffmpeg to finish; whatever
    it raises propagates after ffmpeg has been killed. `on_frame` is called after each frame is sent.
    """
    full_env = {**os.environ, **env} if env else None
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=full_env)
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    reader = threading.Thread(target=_drain, args=(proc.stderr, tail), name="ffmpeg-stderr", daemon=True)
    reader.start()
    stopped_reading = False
    try:
        assert proc.stdin is not None
        for frame in frames:
            if check_interrupt is not None:
                check_interrupt()
            try:
                proc.stdin.write(memoryview(frame).cast("B"))
            except (BrokenPipeError, ConnectionResetError, OSError):
                stopped_reading = True
                break
            if on_frame is not None:
                on_frame()
        try:
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            stopped_reading = True
        while True:
            try:
                returncode = proc.wait(timeout=_WAIT_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if check_interrupt is not None:
                    check_interrupt()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(timeout=5)
        for pipe in (proc.stdin, proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
    if returncode != 0 or stopped_reading:
        early = " and stopped reading frames early" if stopped_reading and returncode == 0 else ""
        last = "\n".join(f"  {line}" for line in tail) or "  (ffmpeg printed nothing)"
        raise FFmpegError(f"ffmpeg {_exit_words(returncode)}{early} while writing {what}; nothing was saved.\n"
                          f"ffmpeg's last lines:\n{last}\nCommand: {_short_command(argv)}")
