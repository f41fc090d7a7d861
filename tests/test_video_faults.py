"""Video Combine when things go wrong around it: a stalled or crashing ffmpeg, leftovers of killed runs,
the VIDEO output's memory, and notices that must reach the user."""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
import weakref

import pytest
import torch
from slipstream import host
from slipstream.host import comfy_video
from slipstream.host.standalone import Interrupted
from slipstream.models.video import encode
from slipstream.models.video.ffmpeg import ENV_VAR, find_ffmpeg
from slipstream.models.video.process import FFmpegError
from slipstream.nodes.video import SlipstreamVideoCombine


def combine(images, fmt="video/h264-mp4", **kw):
    args = {"frame_rate": 8.0, "loop_count": 0, "filename_prefix": "video/fault", "format": fmt, "pingpong": False,
            "save_output": True, "crf": -1, "pix_fmt": "auto", "lossless": False, "quality": 90}
    args.update(kw)
    return SlipstreamVideoCombine().combine(images, **args)


def all_files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def fake_ffmpeg(tmp_path, encode_body: str) -> str:
    """An ffmpeg that answers probes with the real one (the one-frame hardware-encoder tries, which write
    to the null muxer, included) and runs `encode_body` when asked to encode."""
    real = find_ffmpeg().path
    script = tmp_path / "ffmpeg-fake"
    script.write_text(f"#!{sys.executable}\nimport os, sys, time\nif '-i' not in sys.argv or sys.argv[-2:] == "
                      "['null', '-']:\n"
                      f"    os.execv({real!r}, [{real!r}, *sys.argv[1:]])\n{encode_body}\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_interrupt_kills_an_ffmpeg_that_stopped_reading(workdirs, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, fake_ffmpeg(tmp_path, "time.sleep(30)"))   # never reads its stdin
    images = torch.rand(8, 256, 256, 3)          # one frame is bigger than a pipe buffer: the write blocks
    asked = []

    def cancel() -> None:
        time.sleep(0.5)
        asked.append(time.monotonic())
        host.request_interrupt()

    threading.Thread(target=cancel, daemon=True).start()
    with pytest.raises(Interrupted):
        combine(images)
    assert asked and time.monotonic() - asked[0] < 1.5
    assert all_files(workdirs["output"]) == []      # the hidden .partial file is gone too


def test_an_encoder_that_aborts_is_reported_with_its_own_reason(workdirs, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, fake_ffmpeg(
        tmp_path, "sys.stderr.write('Svt[error]: Source Width must be at least 4\\n'); sys.stderr.flush(); "
                  "os.abort()"))
    with pytest.raises(FFmpegError) as err:
        combine(torch.rand(3, 2, 2, 3))
    first = str(err.value).splitlines()[0]
    assert "SIGABRT" in first and "Svt[error]: Source Width must be at least 4" in first
    assert "out of memory" not in first
    assert all_files(workdirs["output"]) == []


def test_stale_scratch_folders_are_swept_and_fresh_ones_kept(tmp_path):
    old, fresh, other = (tmp_path / n for n in ("slipstream-video-old", "slipstream-video-new", "keep-me"))
    for d in (old, fresh, other):
        d.mkdir()
        (d / "palette.png").write_bytes(b"x")
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    os.utime(other, (day_ago, day_ago))
    assert encode.sweep_stale_scratch(str(tmp_path)) == [str(old)]
    assert not old.exists() and fresh.exists() and other.exists()


def test_notes_reach_the_user_through_host_notices(workdirs):
    seen: list[tuple[str, str]] = []
    remove = host.add_notice_hook(lambda node, message: seen.append((node, message)))
    try:
        audio = {"waveform": torch.zeros(1, 1, 800), "sample_rate": 8000}
        combine(torch.rand(3, 16, 16, 3), fmt="image/gif", audio=audio)
    finally:
        remove()
    assert any(node == "Video Combine" and "cannot carry sound" in message for node, message in seen)


class _Components:
    def __init__(self, images, frame_rate, audio=None):
        self.images, self.frame_rate, self.audio = images, frame_rate, audio


class _FromComponents:
    """Stands in for ComfyUI's VideoFromComponents: keeps what it is given."""

    def __init__(self, components):
        self.kept = components

    def save_to(self, path, *args, **kwargs):
        return self.kept.images.shape


def test_pingpong_video_output_gathers_frames_on_demand_and_keeps_none(monkeypatch):
    monkeypatch.setattr(comfy_video, "_video_types", lambda: (None, _FromComponents, _Components))
    images = torch.rand(5, 8, 8, 3)
    calls = []

    def frames() -> torch.Tensor:
        calls.append(1)
        return images[torch.tensor([0, 1, 2, 3, 4, 3, 2, 1])]

    video = comfy_video.video_value("unused.gif", 8, frames, width=8, height=8, frame_count=8)
    assert calls == []                                   # nothing copied while the output sits in the cache
    assert video.get_dimensions() == (8, 8) and video.get_frame_count() == 8 and calls == []
    built = video.get_components().images
    probe = weakref.ref(built)
    assert built.shape[0] == 8 and calls == [1]
    del built
    assert probe() is None                               # the value did not keep the copy
    assert video.save_to("x.mp4") == (8, 8, 8, 3) and calls == [1, 1]
