"""Run ffmpeg with frames streamed into its stdin, and turn every way it can fail into a clear error.

stderr is drained by a thread into a short ring buffer: without it a chatty ffmpeg could fill the
pipe and block while we block writing frames, and with it the error can quote ffmpeg's last lines.
Frames are written by a second thread (_StdinWriter) while the caller's thread waits in short steps
and checks for interruption: a write into a pipe ffmpeg has stopped reading blocks forever, and a
Cancel must still kill ffmpeg and return within a second.
"""

from __future__ import annotations

import collections
import os
import queue
import re
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


# ffmpeg's own summary of why an encoder could not start, e.g. "Error while opening encoder - maybe
# incorrect parameters such as bit_rate, rate, width or height" or svt-av1's "Svt[error]: Instance 1: ...".
_REASON_LINE = re.compile(r"error|invalid|cannot|could not|failed|not supported|unsupported|too small|must be",
                          re.IGNORECASE)


def _own_reason(tail: collections.deque[str]) -> str | None:
    """What ffmpeg itself said went wrong: its first line that reads like an error, else its last line
    (an encoder that crashes prints a single line such as "corrupted size vs. prev_size"); None if silent."""
    lines = [line.strip() for line in tail if line.strip()]
    return next((line for line in lines if _REASON_LINE.search(line)), lines[-1] if lines else None)


# Signals a process raises against itself when it crashes (abort(), bad memory access).
_CRASH_SIGNALS = frozenset(int(getattr(signal, n)) for n in ("SIGABRT", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL")
                           if hasattr(signal, n))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit_words(returncode: int | None, reason: str | None = None) -> str:
    if returncode is None:
        return "did not finish"
    if returncode < 0 and -returncode in _CRASH_SIGNALS and reason is not None:
        # An encoder that rejects its input often aborts (SIGABRT) right after saying why: that line,
        # not a guess about memory, is what the user needs. SIGKILL/SIGTERM come from outside.
        return f"stopped ({_signal_name(-returncode)}) after reporting: {reason}"
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)} (out of memory, or stopped by another program?)"
    return f"exited with code {returncode}"


def _short_command(argv: list[str]) -> str:
    return " ".join(a if len(a) <= 80 else a[:77] + "..." for a in argv)


class _StdinWriter:
    """Writes one frame at a time into ffmpeg's stdin on its own thread.

    The caller hands over a frame and waits for it in short steps (so it can check for interruption);
    frame buffers are reused by the converter, so only one frame is ever in flight.
    """

    def __init__(self, stdin: IO[bytes]):
        self._stdin = stdin
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._done: queue.Queue = queue.Queue(maxsize=1)
        self.broken = False
        self._thread = threading.Thread(target=self._run, name="ffmpeg-stdin", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._jobs.get()) is not None:
            try:
                self._stdin.write(data)
            except (BrokenPipeError, ConnectionResetError, OSError, ValueError):
                self.broken = True
            self._done.put(None)
            if self.broken:
                return

    def write(self, data: memoryview, check_interrupt: Callable[[], None] | None) -> bool:
        """Send one frame; False if ffmpeg stopped reading. Returns only once the frame's buffer is free."""
        if self.broken:
            return False
        self._jobs.put(data)
        while True:
            try:
                self._done.get(timeout=_WAIT_POLL_S)
                return not self.broken
            except queue.Empty:
                if check_interrupt is not None:
                    check_interrupt()

    def stop(self) -> None:
        """Let the thread end (after ffmpeg was killed or stdin closed, a blocked write returns)."""
        if not self.broken:
            try:
                self._jobs.put_nowait(None)
            except queue.Full:
                pass
        self._thread.join(timeout=5)


def run_ffmpeg(argv: list[str], frames: Iterable[np.ndarray], *, what: str,
               env: Mapping[str, str] | None = None, on_frame: Callable[[], None] | None = None,
               check_interrupt: Callable[[], None] | None = None) -> None:
    """Write each frame's bytes to ffmpeg's stdin and wait for it; FFmpegError if it does not succeed.

    `check_interrupt` is called before every frame, every fraction of a second while a frame is being
    written (ffmpeg may have stopped reading) and while waiting for ffmpeg to finish; whatever it raises
    propagates after ffmpeg has been killed. `on_frame` is called after each frame is sent.
    """
    full_env = {**os.environ, **env} if env else None
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=full_env)
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    reader = threading.Thread(target=_drain, args=(proc.stderr, tail), name="ffmpeg-stderr", daemon=True)
    reader.start()
    assert proc.stdin is not None
    writer = _StdinWriter(proc.stdin)
    stopped_reading = False
    try:
        for frame in frames:
            if check_interrupt is not None:
                check_interrupt()
            if not writer.write(memoryview(frame).cast("B"), check_interrupt):
                stopped_reading = True
                break
            if on_frame is not None:
                on_frame()
        writer.stop()
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
        writer.stop()
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
        words = _exit_words(returncode, _own_reason(tail))
        raise FFmpegError(f"ffmpeg {words}{early} while writing {what}; nothing was saved.\n"
                          f"ffmpeg's last lines:\n{last}\nCommand: {_short_command(argv)}")
