"""The Video Combine node end to end in the standalone host: files, names, preview, metadata, failures."""

from __future__ import annotations

import inspect
import json
import os
import stat
import sys

import imageio_ffmpeg
import pytest
import torch
from PIL import Image
from slipstream import host
from slipstream.host.standalone import Interrupted, SavedVideo
from slipstream.models.video.ffmpeg import ENV_VAR, FFmpegNotFoundError, find_ffmpeg
from slipstream.models.video.frames import FrameError
from slipstream.models.video.process import FFmpegError
from slipstream.nodes.video import SlipstreamVideoCombine

PROMPT = {"1": {"class_type": "SlipstreamVideoCombine", "inputs": {}}}
WORKFLOW = {"workflow": {"nodes": [{"id": 1, "type": "SlipstreamVideoCombine"}], "links": []}}


def frames(n=6, h=32, w=48):
    x = torch.rand(1, h, w, 3).expand(n, -1, -1, -1).clone()
    x[:, :, :4] = torch.linspace(0, 1, n).view(n, 1, 1, 1)
    return x


def combine(images=None, fmt="video/h264-mp4", prefix="video/test", save_output=True, audio=None, **kw):
    args = {"frame_rate": 8.0, "loop_count": 0, "filename_prefix": prefix, "format": fmt, "pingpong": False,
            "save_output": save_output, "crf": -1, "pix_fmt": "auto", "lossless": False, "quality": 90}
    args.update(kw)
    return SlipstreamVideoCombine().combine(frames() if images is None else images, audio=audio,
                                            prompt=PROMPT, extra_pnginfo=WORKFLOW, **args)


def all_files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def count_frames(path) -> int:
    gen = imageio_ffmpeg.read_frames(str(path))
    next(gen)
    return sum(1 for _ in gen)


def test_saves_video_and_workflow_png_and_returns_core_preview(workdirs):
    out = combine(pingpong=True)
    png, video = out["result"][0]
    assert out["ui"] == {"images": [{"filename": "test_00001_.mp4", "subfolder": "video", "type": "output"}],
                         "animated": (True,)}
    assert video == str(workdirs["output"] / "video" / "test_00001_.mp4")
    assert png == str(workdirs["output"] / "video" / "test_00001_.png")
    assert count_frames(video) == 10
    with Image.open(png) as im:
        assert im.size == (48, 32)
        assert json.loads(im.text["prompt"]) == PROMPT and json.loads(im.text["workflow"]) == WORKFLOW["workflow"]
    saved = out["result"][1]
    assert isinstance(saved, SavedVideo) and saved.get_stream_source() == video
    assert (saved.get_dimensions(), saved.get_frame_count(), saved.get_frame_rate()) == ((48, 32), 10, 8)


def test_never_overwrites_and_png_shares_the_video_number(workdirs):
    target = workdirs["output"] / "video"
    target.mkdir()
    (target / "test_00001_.mp4").write_bytes(b"someone else's file")
    first = combine()["result"][0]
    second = combine(fmt="image/gif")["result"][0]
    assert [os.path.basename(p) for p in first + second] == [
        "test_00002_.png", "test_00002_.mp4", "test_00003_.png", "test_00003_.gif"]
    assert (target / "test_00001_.mp4").read_bytes() == b"someone else's file"


def test_save_output_off_goes_to_temp(workdirs):
    out = combine(save_output=False, fmt="image/webp")
    assert out["ui"]["images"][0]["type"] == "temp"
    assert out["result"][0][1].startswith(str(workdirs["temp"]))
    assert all_files(workdirs["output"]) == []


def test_prefix_patterns_and_subfolders(workdirs):
    out = combine(prefix="clips/%date:yyyy%/%width%x%height%")
    year = str(__import__("time").localtime().tm_year)
    assert out["ui"]["images"][0] == {"filename": "48x32_00001_.mp4", "subfolder": f"clips/{year}", "type": "output"}
    with pytest.raises(ValueError, match="outside the output folder"):
        combine(prefix="../escape")


def test_metadata_can_be_switched_off(workdirs, monkeypatch):
    monkeypatch.setenv("SLIPSTREAM_DISABLE_METADATA", "1")
    files = combine()["result"][0]
    assert len(files) == 1 and files[0].endswith(".mp4")


def test_audio_reaches_the_file(workdirs):
    tone = {"waveform": torch.sin(torch.arange(8000) * 0.3).view(1, 1, -1), "sample_rate": 8000}
    video = combine(fmt="video/vp9-webm", audio=tone)["result"][0][1]
    gen = imageio_ffmpeg.read_frames(video)
    assert next(gen)["audio_codec"].startswith(("opus", "vorbis"))
    gen.close()


# ---------------------------------------------------------------- failures leave nothing behind


@pytest.mark.parametrize(("images", "kw", "error", "words"), [
    (torch.zeros(0, 8, 8, 3), {}, FrameError, "empty batch"),
    (torch.full((3, 8, 8, 3), float("nan")), {}, FrameError, "frame 0 contains NaN"),
    (None, {"frame_rate": 0.0}, ValueError, "frame_rate must be a number above 0"),
    (None, {"frame_rate": -8.0}, ValueError, "frame_rate must be a number above 0"),
    (None, {"fmt": "video/av1-webm", "crf": 0}, ValueError, "outside 1..63"),
])
def test_bad_input_is_refused_and_writes_nothing(workdirs, images, kw, error, words):
    with pytest.raises(error, match=words):
        combine(images, **kw)
    assert all_files(workdirs["output"]) == []


def _fake_ffmpeg(tmp_path, behaviour: str) -> str:
    """An ffmpeg for SLIPSTREAM_FFMPEG that answers probes with the real one and misbehaves when encoding."""
    real = find_ffmpeg().path
    script = tmp_path / f"ffmpeg-{behaviour}"
    script.write_text(f"""#!{sys.executable}
import os, signal, subprocess, sys
REAL = {real!r}
if "-i" not in sys.argv:
    os.execv(REAL, [REAL, *sys.argv[1:]])
if {behaviour!r} == "refuse":
    sys.stderr.write("Error: fake-ffmpeg refuses this encode\\n")
    sys.exit(1)
proc = subprocess.Popen([REAL, *sys.argv[1:]], stdin=subprocess.PIPE)
sent = 0
while True:
    chunk = sys.stdin.buffer.read(1 << 14)
    if not chunk:
        break
    proc.stdin.write(chunk)
    sent += len(chunk)
    if sent > 3 * 32 * 48 * 3:      # about three frames in: the real encoder has started writing
        sys.stderr.write("fake-ffmpeg: dying midway on purpose\\n")
        sys.stderr.flush()
        proc.kill()
        os.kill(os.getpid(), signal.SIGKILL)
proc.stdin.close()
sys.exit(proc.wait())
""", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_killed_ffmpeg_leaves_no_file_and_quotes_its_last_lines(workdirs, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, _fake_ffmpeg(tmp_path, "die"))
    with pytest.raises(FFmpegError) as err:
        combine(frames(40))
    message = str(err.value)
    assert "killed by SIGKILL" in message and "fake-ffmpeg: dying midway on purpose" in message
    assert all_files(workdirs["output"]) == []


def test_failing_ffmpeg_exit_code_and_message(workdirs, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, _fake_ffmpeg(tmp_path, "refuse"))
    with pytest.raises(FFmpegError, match="(?s)exited with code 1.*fake-ffmpeg refuses this encode"):
        combine(fmt="image/gif")
    assert all_files(workdirs["output"]) == []


def test_interrupt_stops_ffmpeg_and_leaves_nothing(workdirs):
    def interrupt_at_third_frame(value, total):
        if value == 3:
            host.request_interrupt()

    remove = host.add_progress_hook(interrupt_at_third_frame)
    try:
        with pytest.raises(Interrupted):
            combine(frames(20))
    finally:
        remove()
    assert all_files(workdirs["output"]) == []


def test_progress_counts_every_frame_sent(workdirs):
    seen = []
    remove = host.add_progress_hook(lambda value, total: seen.append((value, total)))
    try:
        combine(frames(4), fmt="image/gif", pingpong=True)      # palette pass (4) + 6 frames
    finally:
        remove()
    assert seen[-1] == (10, 10) and [v for v, _ in seen] == list(range(1, 11))


# ---------------------------------------------------------------- what the node tells ComfyUI


def test_validate_inputs_checks_only_the_prefix_and_running_checks_the_rest(workdirs):
    # ComfyUI files VALIDATE_INPUTS' answer under every input it names: naming format, crf and pix_fmt
    # there reported one bad format three times. format is left to ComfyUI's own list check.
    validate = SlipstreamVideoCombine.VALIDATE_INPUTS
    assert list(inspect.signature(validate).parameters) == ["filename_prefix"]
    assert validate("video/clip") is True and validate(None) is True
    assert "filename_prefix" in validate("bad\x00name")
    with pytest.raises(ValueError, match="(?i)unknown format"):
        combine(fmt="video/mpeg2")
    with pytest.raises(ValueError, match="supports pix_fmt"):
        combine(fmt="video/av1-webm", pix_fmt="yuva420p")
    with pytest.raises(ValueError, match="outside 0..51"):
        combine(crf=60)
    assert all_files(workdirs["output"]) == []


def test_format_list_follows_the_ffmpeg_build(tmp_path, monkeypatch):
    real = find_ffmpeg().path
    script = tmp_path / "ffmpeg-no-av1"
    script.write_text(f"""#!{sys.executable}
import subprocess, sys
out = subprocess.run([{real!r}, *sys.argv[1:]], capture_output=True, text=True)
lines = [l for l in out.stdout.splitlines() if "av1" not in l]
print("\\n".join(lines))
sys.exit(out.returncode)
""", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(ENV_VAR, str(script))
    formats, opts = SlipstreamVideoCombine.INPUT_TYPES()["required"]["format"]
    assert "video/av1-webm" not in formats and "video/h264-mp4" in formats
    assert "no libsvtav1 or libaom-av1 encoder" in opts["tooltip"]
    with pytest.raises(ValueError, match="no libsvtav1 or libaom-av1 encoder"):
        SlipstreamVideoCombine().combine(frames(), 8.0, 0, "x", "video/av1-webm", False, False,
                                         -1, "auto", False, 90)


def test_without_ffmpeg_formats_stay_listed_and_running_says_why(workdirs, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing-ffmpeg"))
    formats, opts = SlipstreamVideoCombine.INPUT_TYPES()["required"]["format"]
    assert "video/h264-mp4" in formats and "NO FFMPEG FOUND" in opts["tooltip"]
    with pytest.raises(FFmpegNotFoundError):
        combine()
    assert all_files(workdirs["output"]) == []


@pytest.mark.parametrize(("fmt", "from_frames"), [("video/h264-mp4", False), ("video/vp9-webm", False),
                                                  ("image/gif", True), ("image/webp", True)])
def test_video_output_is_the_file_or_the_frames_as_written(workdirs, monkeypatch, fmt, from_frames):
    import slipstream.nodes.video as node_module

    seen = {}

    def capture(path, **kw):
        seen.update(kw, path=path)
        return "VIDEO"

    monkeypatch.setattr(node_module, "video_value", capture)
    images = frames(4)
    out = combine(images, fmt=fmt, pingpong=True)
    assert out["result"][1] == "VIDEO" and seen["path"] == out["result"][0][1] and seen["frame_count"] == 6
    if from_frames:
        assert torch.equal(seen["frames"](), images[[0, 1, 2, 3, 2, 1]])
    else:
        assert seen["frames"] is None
