"""Encode every format, read the files back with other tools (imageio-ffmpeg, Pillow, ffmpeg), compare."""

from __future__ import annotations

import json
import math
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from slipstream.models.video.encode import EncodeSettings, encode_frames
from slipstream.models.video.ffmpeg import find_ffmpeg
from slipstream.models.video.formats import FORMATS, available_formats

# What this machine's ffmpeg can write (NVENC needs an NVIDIA GPU); png sequences have their own tests.
FORMAT_NAMES = [f.name for f in available_formats(find_ffmpeg()) if f.kind != "images"]
EXT = {f.name: f.extension for f in FORMATS}
W, H = 64, 48


def moving_frames(n: int, width: int = W, height: int = H) -> torch.Tensor:
    """Frames that differ from each other (encoders merge identical frames): a bar that moves."""
    x = torch.zeros(n, height, width, 3)
    x[..., 2] = torch.linspace(0, 1, width)
    for i in range(n):
        x[i, :, (i * 7) % width: (i * 7) % width + 6, 0] = 1.0
    return x


def colour_blocks(n: int = 3, block: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """8 flat colour blocks of block×block pixels (aligned to chroma blocks), and the uint8 values expected."""
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1],
                            [0.2, 0.4, 0.6]])
    img = torch.zeros(2 * block, 4 * block, 3)
    for i, c in enumerate(colours):
        r, q = divmod(i, 4)
        img[r * block:(r + 1) * block, q * block:(q + 1) * block] = c
    return img.expand(n, -1, -1, -1).clone(), (img.numpy() * 255 + 0.5).astype(np.uint8)


def encode(tmp_path, images, fmt, name="out", **kw):
    path = tmp_path / f"{name}.{EXT[fmt]}"
    kw.setdefault("frame_rate", 10.0)
    audio = kw.pop("audio", None)
    result = encode_frames(images, EncodeSettings(fmt, **kw), str(path), audio=audio)
    return path, result


def read_video(path, pix_fmt="rgb24", decoder=None):
    """(meta, frames [N,H,W,C] uint8) through imageio-ffmpeg, i.e. another reader than the writer."""
    channels = 4 if pix_fmt == "rgba" else 3
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt=pix_fmt, bits_per_pixel=8 * channels,
                                     input_params=["-c:v", decoder] if decoder else None)
    meta = next(gen)
    w, h = meta["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(h, w, channels) for f in gen])
    return meta, frames


def container_tags(path) -> dict[str, str]:
    out = subprocess.run([find_ffmpeg().path, "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                         capture_output=True, check=True).stdout.decode("utf-8")
    tags, key = {}, None
    for line in out.split("\n")[1:]:
        if key is not None:                     # continuation of an escaped newline
            tags[key] += "\n" + line
            key = key if line.endswith("\\") else None
            continue
        if "=" in line:
            k, v = line.split("=", 1)
            tags[k.lower()] = v
    return {k: v.replace("\\=", "=").replace("\\;", ";").replace("\\#", "#").replace("\\\\", "\\")
            for k, v in tags.items()}


def decode_audio(path, rate=48000) -> np.ndarray:
    raw = subprocess.run([find_ffmpeg().path, "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "f32le",
                          "-ac", "1", "-ar", str(rate), "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.float32)


# ---------------------------------------------------------------- frame count, rate, size, loop


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_each_format_reads_back_with_count_rate_size_and_loop(tmp_path, fmt):
    n = 5
    path, result = encode(tmp_path, moving_frames(n), fmt, pingpong=True, loop_count=2, frame_rate=20.0)
    kind = next(f.kind for f in FORMATS if f.name == fmt)
    expected = (2 * n - 2) * (1 if kind in ("gif", "webp") else 3)     # video/* repeats the clip loop_count more times
    assert result.frame_count == expected
    meta, frames = read_video(path)
    assert frames.shape == (expected, H, W, 3)
    assert meta["size"] == (W, H)
    if kind == "video":
        assert meta["fps"] == pytest.approx(20.0)
        # pingpong: frame 5 of the output is input frame 3 (0 1 2 3 4 3 2 1)
        assert np.abs(frames[5].astype(int) - frames[3].astype(int)).mean() < 4
    else:
        with Image.open(path) as im:
            assert im.info["loop"] == 2
            durations = []
            for frame in ImageSequence.Iterator(im):
                frame.load()                    # WebP fills in a frame's duration when it is decoded
                durations.append(frame.info["duration"])
            assert len(durations) == expected and all(d == pytest.approx(50, abs=1) for d in durations)


def test_without_pingpong_or_loop_every_frame_is_written_once(tmp_path):
    path, result = encode(tmp_path, moving_frames(4), "video/h264-mp4", frame_rate=23.976)
    meta, frames = read_video(path)
    assert result.frame_count == 4 and frames.shape[0] == 4
    assert str(result.frame_rate) == "2997/125" and meta["fps"] == pytest.approx(23.98, abs=0.01)


@pytest.mark.parametrize("fmt", ["video/h264-mp4", "video/vp9-webm", "image/webp"])
def test_a_single_frame_is_a_valid_file(tmp_path, fmt):
    path, result = encode(tmp_path, moving_frames(1), fmt)
    assert result.frame_count == 1 and read_video(path)[1].shape == (1, H, W, 3)


def test_gif_loop_forever_and_one_frame(tmp_path):
    path, result = encode(tmp_path, moving_frames(1), "image/gif", pingpong=True)
    with Image.open(path) as im:
        assert im.n_frames == 1 and im.info["loop"] == 0
    assert any("pingpong needs 3 or more" in n for n in result.notes)


# ---------------------------------------------------------------- colours


@pytest.mark.parametrize(("fmt", "opts", "tolerance"), [
    ("image/gif", {}, 0),
    ("image/webp", {"lossless": True}, 0),
    ("image/webp", {"lossless": False, "quality": 90}, 8),
    ("video/h264-mp4", {}, 10),
    ("video/h265-mp4", {}, 10),
    ("video/vp9-webm", {}, 10),
    ("video/av1-webm", {}, 10),
    ("video/h264-mp4", {"pix_fmt": "yuv444p", "crf": 0}, 2),
])
def test_colours_survive_within_codec_tolerance(tmp_path, fmt, opts, tolerance):
    frames, expected = colour_blocks()
    path, _ = encode(tmp_path, frames, fmt, **opts)
    _, got = read_video(path)
    inner = np.s_[:, 4:-4, 4:-4]
    for i in range(8):
        r, q = divmod(i, 4)
        block = np.s_[r * 16:(r + 1) * 16, q * 16:(q + 1) * 16]
        err = np.abs(got[:, block[0], block[1]][inner].astype(int) - expected[block][inner[1:]].astype(int))
        assert err.max() <= tolerance, f"{fmt} block {i}: max error {err.max()}"


def test_pix_fmt_choice_reaches_the_stream(tmp_path):
    path, result = encode(tmp_path, moving_frames(2), "video/h264-mp4", pix_fmt="yuv444p")
    meta, _ = read_video(path)
    assert result.pix_fmt == "yuv444p" and meta["pix_fmt"].startswith("yuv444p")


# ---------------------------------------------------------------- odd sizes and alpha


def test_odd_size_is_padded_for_yuv420_and_kept_for_gif(tmp_path):
    odd = moving_frames(3, width=63, height=47)
    path, result = encode(tmp_path, odd, "video/h264-mp4")
    assert read_video(path)[0]["size"] == (64, 48) and (result.width, result.height) == (64, 48)
    assert any("padded to 64×48" in n for n in result.notes)
    path, result = encode(tmp_path, odd, "image/gif")
    assert read_video(path)[0]["size"] == (63, 47) and not result.notes


def _rgba_frames(n=3):
    x = torch.cat([moving_frames(n), torch.full((n, H, W, 1), 0.5)], dim=-1)
    x[:, :, : W // 2, 3] = 1.0
    return x


def test_alpha_is_kept_in_webp(tmp_path):
    path, result = encode(tmp_path, _rgba_frames(), "image/webp", lossless=True)
    with Image.open(path) as im:
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
    assert alpha[:, : W // 2].min() == 255 and np.all(alpha[:, W // 2:] == 128)
    assert not result.notes


def test_alpha_is_kept_in_vp9(tmp_path):
    path, result = encode(tmp_path, _rgba_frames(), "video/vp9-webm")
    assert result.pix_fmt == "yuva420p"
    _, frames = read_video(path, pix_fmt="rgba", decoder="libvpx-vp9")
    assert np.abs(frames[:, 8:-8, 8:W // 2 - 8, 3].astype(int) - 255).max() <= 4
    assert np.abs(frames[:, 8:-8, W // 2 + 8:-8, 3].astype(int) - 128).max() <= 4


def test_alpha_is_flattened_onto_black_in_mp4(tmp_path):
    x = torch.zeros(2, H, W, 4)
    x[..., 0] = 1.0
    x[..., 3] = 0.5
    path, result = encode(tmp_path, x, "video/h264-mp4")
    _, frames = read_video(path)
    assert np.abs(frames[..., 0].astype(int) - 128).max() <= 6
    assert any("flattened onto black" in n for n in result.notes)


# ---------------------------------------------------------------- audio


def _tone(seconds: float, rate: int = 44100, hz: float = 440.0) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    wave = (0.5 * torch.sin(2 * math.pi * hz * t)).view(1, 1, -1).repeat(1, 2, 1)
    return {"waveform": wave, "sample_rate": rate}


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("fmt", ["video/h264-mp4", "video/vp9-webm"])
def test_audio_tone_is_muxed_and_padded_to_the_video(tmp_path, fmt):
    # 20 frames at 10 fps = 2 s of video, 1 s of tone: the second second must be silence.
    path, result = encode(tmp_path, moving_frames(20), fmt, audio=_tone(1.0))
    assert result.has_audio and any("padded with silence" in n for n in result.notes)
    samples = decode_audio(path)
    assert len(samples) / 48000 == pytest.approx(2.0, abs=0.08)
    assert _dominant_hz(samples[4800:43200], 48000) == pytest.approx(440, abs=5)
    assert np.abs(samples[int(1.2 * 48000):int(1.9 * 48000)]).max() < 0.01


def test_long_audio_is_cut_to_the_video(tmp_path):
    path, result = encode(tmp_path, moving_frames(5), "video/h264-mp4", audio=_tone(3.0))
    assert any("cut" in n for n in result.notes)
    assert len(decode_audio(path)) / 48000 == pytest.approx(0.5, abs=0.06)


def test_audio_is_ignored_with_a_note_for_gif(tmp_path):
    path, result = encode(tmp_path, moving_frames(3), "image/gif", audio=_tone(1.0))
    assert not result.has_audio and any("cannot carry sound" in n for n in result.notes)


# ---------------------------------------------------------------- metadata


@pytest.mark.parametrize("fmt", ["video/h264-mp4", "video/vp9-webm"])
def test_workflow_and_prompt_are_container_tags(tmp_path, fmt):
    # Larger than Linux's 128 KiB limit for one command-line argument, with every reserved character.
    workflow = {"nodes": [{"id": i, "note": "a=b;c#d\\e"} for i in range(6000)]}
    tags = {"prompt": json.dumps({"1": {"class_type": "X", "inputs": {"text": "line1\nline2"}}}),
            "workflow": json.dumps(workflow)}
    assert len(tags["workflow"]) > 128 * 1024
    path, _ = encode(tmp_path, moving_frames(2), fmt, metadata=tags)
    read = container_tags(path)
    assert json.loads(read["workflow"]) == workflow
    assert json.loads(read["prompt"]) == json.loads(tags["prompt"])
