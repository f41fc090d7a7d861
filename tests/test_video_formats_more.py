"""The formats at the well-known Video Combine names: ProRes, ffv1, png sequences (8/16 bit), nvenc only where it
runs; plus trim_to_audio and the `comment` tag. Files are read back with other tools than the writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from slipstream.models.video.encode import EncodeSettings, encode_frames
from slipstream.models.video.ffmpeg import find_ffmpeg
from slipstream.models.video.formats import available_formats, get_format, missing_formats

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from test_video_encode import container_tags, decode_audio, moving_frames, read_video  # noqa: E402

W, H = 64, 48
BUILD = find_ffmpeg()
AVAILABLE = {f.name for f in available_formats(BUILD)}


def needs(fmt: str):
    return pytest.mark.skipif(fmt not in AVAILABLE, reason=f"this ffmpeg cannot write {fmt}")


def encode(tmp_path, images, fmt, name="out", **kw):
    f = get_format(fmt)
    path = tmp_path / (name if f.kind == "images" else f"{name}.{f.extension}")
    if f.kind == "images":
        path.mkdir()
    kw.setdefault("frame_rate", 10.0)
    audio = kw.pop("audio", None)
    return path, encode_frames(images, EncodeSettings(fmt, **kw), str(path), audio=audio)


def stream_line(path) -> str:
    """ffmpeg's description of the first video stream (codec, pix_fmt, size)."""
    err = subprocess.run([BUILD.path, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    return next(line for line in err.splitlines() if "Video:" in line)


def decode_rgb48(path, w=W, h=H) -> np.ndarray:
    raw = subprocess.run([BUILD.path, "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb48le", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, "<u2").reshape(-1, h, w, 3)


def smooth_frames(n: int) -> torch.Tensor:
    """Gradients finer than 8 bits can hold, so 16-bit output is distinguishable from 8-bit."""
    x = torch.zeros(n, H, W, 3)
    x[..., 0] = torch.linspace(0, 1, W)
    x[..., 1] = torch.linspace(0, 1, H).view(H, 1)
    x[..., 2] = torch.linspace(0.3, 0.31, n).view(n, 1, 1)
    return x


# ---------------------------------------------------------------- the list follows the build


def test_every_format_is_listed_or_missing_with_a_reason():
    missing = missing_formats(BUILD)
    for name in ["video/webm", "video/h264-mp4", "video/h265-mp4", "video/av1-webm", "video/ProRes",
                 "video/ffv1-mkv", "video/nvenc_h264-mp4", "video/nvenc_hevc-mp4", "image/png", "video/16bit-png"]:
        assert (name in AVAILABLE) != (name in missing), name
        if name in missing:
            assert name in missing[name]
    if "h264_nvenc" in BUILD.encoders and "video/nvenc_h264-mp4" not in AVAILABLE:
        assert "cannot run here" in missing["video/nvenc_h264-mp4"]      # listed by -encoders, but no GPU here


# ---------------------------------------------------------------- ProRes, ffv1, nvenc


@needs("video/ProRes")
def test_prores_is_10_bit_422_and_4444_with_alpha(tmp_path):
    path, result = encode(tmp_path, moving_frames(4), "video/ProRes", pingpong=True)
    assert result.frame_count == 6 and read_video(path)[1].shape == (6, H, W, 3)
    assert "prores" in stream_line(path) and "yuv422p10le" in stream_line(path)
    rgba = torch.cat([moving_frames(2), torch.full((2, H, W, 1), 0.5)], dim=-1)
    path, result = encode(tmp_path, rgba, "video/ProRes", name="alpha")
    assert result.pix_fmt == "yuva444p10le" and "prores (4444)" in stream_line(path)
    assert read_video(path, pix_fmt="rgba")[1][..., 3].mean() == pytest.approx(128, abs=2)


@needs("video/ffv1-mkv")
def test_ffv1_is_lossless_at_16_bits(tmp_path):
    images = smooth_frames(3)
    path, result = encode(tmp_path, images, "video/ffv1-mkv", loop_count=1)
    assert result.frame_count == 6 and "ffv1" in stream_line(path) and "gbrp16le" in stream_line(path)
    decoded = decode_rgb48(path)
    want = np.floor(np.clip(images.double().numpy() * 65535 + 0.5, 0, 65535)).astype(np.uint16)
    assert decoded.shape == (6, H, W, 3)
    assert np.array_equal(decoded[:3], want) and np.array_equal(decoded[3:], want)


@pytest.mark.parametrize("fmt", ["video/nvenc_h264-mp4", "video/nvenc_hevc-mp4"])
def test_nvenc_round_trips_where_it_runs_and_is_refused_clearly_where_not(tmp_path, fmt):
    if fmt in AVAILABLE:
        path, result = encode(tmp_path, moving_frames(5), fmt)
        assert result.frame_count == 5 and read_video(path)[1].shape == (5, H, W, 3)
    else:
        with pytest.raises(ValueError, match="formats this ffmpeg can write: .*video/h264-mp4"):
            encode(tmp_path, moving_frames(2), fmt)
        assert not list(tmp_path.iterdir())


@needs("video/webm")
def test_vp9_webm_old_name_writes_what_the_new_one_does(tmp_path):
    a, _ = encode(tmp_path, moving_frames(3), "video/webm", name="new")
    b, _ = encode(tmp_path, moving_frames(3), "video/vp9-webm", name="old")
    assert "vp9" in stream_line(a) and "vp9" in stream_line(b)
    assert np.array_equal(read_video(a)[1], read_video(b)[1])


# ---------------------------------------------------------------- png sequences


def _ihdr(path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) straight from the file's IHDR chunk."""
    data = open(path, "rb").read(33)
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), data[24], data[25]


@pytest.mark.parametrize(("fmt", "depth"), [("image/png", 8), ("video/8bit-png", 8), ("video/16bit-png", 16)])
def test_png_sequence_writes_one_numbered_file_per_frame(tmp_path, fmt, depth):
    images = smooth_frames(4)
    folder, result = encode(tmp_path, images, fmt, pingpong=True, loop_count=3,
                            metadata={"prompt": json.dumps({"1": {}}), "workflow": json.dumps({"nodes": []})})
    names = sorted(os.listdir(folder))
    assert names == [f"{i:05d}.png" for i in range(1, 7)] and result.frame_count == 6     # loop_count: not used
    assert all(_ihdr(folder / n) == (W, H, depth, 2) for n in names)                    # 2 = RGB
    if depth == 16:                                                                       # pingpong: frame 3 -> 2
        got = decode_rgb48(folder / "00005.png")[0]
    else:
        with Image.open(folder / "00005.png") as im:
            got = np.asarray(im)
    scale = 65535 if depth == 16 else 255
    want = np.floor(np.clip(images[2].double().numpy() * scale + 0.5, 0, scale))
    assert np.array_equal(got.astype(np.float64), want)
    with Image.open(folder / "00001.png") as im:
        assert json.loads(im.text["prompt"]) == {"1": {}} and json.loads(im.text["workflow"]) == {"nodes": []}
    with Image.open(folder / "00002.png") as im:
        assert "prompt" not in im.text


def test_png_sequence_keeps_alpha_in_16_bits(tmp_path):
    rgba = torch.cat([smooth_frames(2), torch.full((2, H, W, 1), 0.25)], dim=-1)
    folder, _ = encode(tmp_path, rgba, "video/16bit-png")
    assert _ihdr(folder / "00001.png")[2:] == (16, 6)                                      # 6 = RGBA
    raw = subprocess.run([BUILD.path, "-v", "error", "-i", str(folder / "00002.png"), "-f", "rawvideo",
                          "-pix_fmt", "rgba64le", "-"], capture_output=True, check=True).stdout
    assert np.all(np.frombuffer(raw, "<u2").reshape(H, W, 4)[..., 3] == 16384)          # 0.25·65535 + 0.5


def test_failed_png_sequence_leaves_the_folder_empty(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        encode(tmp_path, torch.full((2, 8, 8, 3), float("nan")), "image/png")
    assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------- trim_to_audio, comment tag


def _tone(seconds: float, rate: int = 8000) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    return {"waveform": (0.5 * torch.sin(2 * torch.pi * 440 * t)).view(1, 1, -1), "sample_rate": rate}


def test_trim_to_audio_cuts_the_video_to_a_shorter_sound(tmp_path):
    path, result = encode(tmp_path, moving_frames(20), "video/h264-mp4", audio=_tone(0.75), trim_to_audio=True,
                          loop_count=1)
    assert result.frame_count == 8                                       # ceil(0.75 s × 10 fps)
    assert read_video(path)[1].shape[0] == 8 and any("trim_to_audio" in n for n in result.notes)
    assert len(decode_audio(path)) / 48000 == pytest.approx(0.8, abs=0.06)


def test_trim_to_audio_leaves_a_video_shorter_than_its_sound_and_is_off_by_default(tmp_path):
    _, longer_sound = encode(tmp_path, moving_frames(5), "video/h264-mp4", name="a", audio=_tone(2.0),
                             trim_to_audio=True)
    _, default = encode(tmp_path, moving_frames(20), "video/h264-mp4", name="b", audio=_tone(0.75))
    assert longer_sound.frame_count == 5 and default.frame_count == 20


@pytest.mark.parametrize("fmt", ["video/h264-mp4", "video/webm", "video/ProRes", "video/ffv1-mkv"])
def test_video_containers_carry_the_workflow_as_tags_and_as_one_comment(tmp_path, fmt):
    if fmt not in AVAILABLE:
        pytest.skip(f"this ffmpeg cannot write {fmt}")
    tags = {"prompt": json.dumps({"1": {"class_type": "X"}}), "workflow": json.dumps({"nodes": [1, 2]})}
    path, _ = encode(tmp_path, moving_frames(2), fmt, metadata=tags)
    read = container_tags(path)
    assert json.loads(read["prompt"]) == {"1": {"class_type": "X"}}
    comment = json.loads(read["comment"])
    assert json.loads(comment["workflow"]) == {"nodes": [1, 2]} and json.loads(comment["prompt"])["1"]
