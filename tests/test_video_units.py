"""Video Combine's parts without running an encode: frame checks and conversion, audio, formats, ffmpeg lookup."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from slipstream.models.video import ffmpeg as ffmpeg_mod
from slipstream.models.video.audio import AudioError, write_raw_audio
from slipstream.models.video.encode import PALETTE_SAMPLE_PIXELS, palette_sample
from slipstream.models.video.formats import (
    FORMATS,
    available_formats,
    check_choice,
    get_format,
    ignored_options,
    missing_formats,
    needs_even_size,
)
from slipstream.models.video.frames import (
    FrameConverter,
    FrameError,
    check_frames,
    even_sample,
    frame_order,
    order_length,
)
from slipstream.models.video.metadata import comfy_metadata, write_ffmetadata

# ---------------------------------------------------------------- frames


@pytest.mark.parametrize(("shape", "words"), [
    ((0, 8, 8, 3), "empty batch"),
    ((8, 8, 3), "without a batch"),
    ((2, 8, 8, 2), "2 channels"),
    ((2, 0, 8, 3), "at least 1×1"),
])
def test_check_frames_refuses_bad_shapes(shape, words):
    with pytest.raises(FrameError, match=words):
        check_frames(torch.zeros(shape))


def test_check_frames_refuses_nan_and_names_the_frame():
    x = torch.rand(4, 6, 6, 3)
    x[2, 1, 1, 0] = float("nan")
    with pytest.raises(FrameError, match="frame 2 contains NaN"):
        check_frames(x)


def test_check_frames_refuses_integer_images():
    with pytest.raises(FrameError, match="dtype"):
        check_frames(torch.zeros(1, 4, 4, 3, dtype=torch.uint8))


def test_check_frames_counts_out_of_range_frames():
    x = torch.rand(5, 4, 4, 3)
    x[1] += 2.0
    x[3, 0, 0, 0] = -0.5
    check = check_frames(x.half())  # non-float32 dtypes are read frame by frame too
    assert (check.count, check.height, check.width, check.channels, check.out_of_range_frames) == (5, 4, 4, 3, 2)


def test_check_frames_stops_on_interrupt():
    class Stopped(Exception):
        pass

    seen = []

    def interrupt_at_third_frame():
        seen.append(1)
        if len(seen) == 3:
            raise Stopped

    with pytest.raises(Stopped):
        check_frames(torch.rand(6, 4, 4, 3), interrupt_at_third_frame)
    assert len(seen) == 3


def test_converter_rounds_like_comfyui_and_clamps():
    x = torch.rand(1, 5, 7, 3) * 1.4 - 0.2
    conv = FrameConverter(5, 7, 3, keep_alpha=False, pad_to_even=False)
    got = conv.convert(x[0])
    want = np.clip(x[0].numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert got.dtype == np.uint8 and got.shape == (5, 7, 3)
    assert np.array_equal(got, want)


def test_converter_pads_odd_sizes_by_repeating_the_edge():
    x = torch.rand(5, 7, 3)
    conv = FrameConverter(5, 7, 3, keep_alpha=False, pad_to_even=True)
    got = conv.convert(x).copy()
    assert got.shape == (6, 8, 3) and conv.padded
    assert np.array_equal(got[:5, 7], got[:5, 6])
    assert np.array_equal(got[5], got[4])


def test_converter_flattens_or_keeps_alpha_and_expands_grey():
    rgba = torch.tensor([[[[1.0, 0.5, 0.0, 0.5]]]])
    flat = FrameConverter(1, 1, 4, keep_alpha=False, pad_to_even=False)
    assert flat.pix_fmt == "rgb24" and flat.convert(rgba[0]).tolist() == [[[128, 64, 0]]]
    keep = FrameConverter(1, 1, 4, keep_alpha=True, pad_to_even=False)
    assert keep.pix_fmt == "rgba" and keep.convert(rgba[0]).tolist() == [[[255, 128, 0, 128]]]
    grey = FrameConverter(1, 1, 1, keep_alpha=True, pad_to_even=False)
    assert grey.pix_fmt == "rgb24" and grey.convert(torch.tensor([[[0.2]]])).tolist() == [[[51, 51, 51]]]


def test_converter_reuses_one_buffer_per_frame():
    """Memory stays flat with frame count: every frame is written into the same buffer."""
    conv = FrameConverter(4, 4, 3, keep_alpha=False, pad_to_even=False)
    x = torch.rand(3, 4, 4, 3)
    first = conv.convert(x[0])
    assert conv.convert(x[1]) is first and conv.convert(x[2]) is first
    assert conv.frame_bytes == 4 * 4 * 3


@pytest.mark.parametrize(("n", "pingpong", "repeats", "want"), [
    (4, False, 1, [0, 1, 2, 3]),
    (4, True, 1, [0, 1, 2, 3, 2, 1]),
    (3, True, 2, [0, 1, 2, 1, 0, 1, 2, 1]),
    (2, True, 1, [0, 1]),
    (1, True, 3, [0, 0, 0]),
])
def test_frame_order(n, pingpong, repeats, want):
    assert list(frame_order(n, pingpong, repeats)) == want
    assert order_length(n, pingpong, repeats) == len(want)


def test_even_sample_spreads_over_the_clip():
    assert even_sample(10, 20) == list(range(10))
    assert even_sample(81, 5) == [0, 20, 40, 60, 80]
    assert even_sample(7, 1) == [0]


def test_gif_palette_is_built_from_a_bounded_sample():
    frames, step = palette_sample(81, 480, 832)
    assert step == 2 and len(frames) * 240 * 416 <= PALETTE_SAMPLE_PIXELS and frames[0] == 0 and frames[-1] == 80
    assert palette_sample(6, 48, 64) == ([0, 1, 2, 3, 4, 5], 1)


# ---------------------------------------------------------------- audio


def _read_f32(path: str, channels: int) -> np.ndarray:
    return np.fromfile(path, dtype=np.float32).reshape(-1, channels)


def test_audio_is_padded_to_the_video_length(tmp_path):
    wave = torch.arange(6, dtype=torch.float32).view(1, 2, 3)    # 2 channels, 3 samples
    raw = write_raw_audio({"waveform": wave, "sample_rate": 4}, 1.25, str(tmp_path / "a.f32"))
    assert (raw.channels, raw.sample_rate, raw.samples) == (2, 4, 5)
    assert _read_f32(raw.path, 2).tolist() == [[0, 3], [1, 4], [2, 5], [0, 0], [0, 0]]
    assert any("padded with silence" in n for n in raw.notes)


def test_audio_is_cut_and_first_clip_of_a_batch_used(tmp_path):
    wave = torch.rand(2, 1, 100)
    raw = write_raw_audio({"waveform": wave, "sample_rate": 10}, 2.0, str(tmp_path / "a.f32"))
    assert np.allclose(_read_f32(raw.path, 1)[:, 0], wave[0, 0, :20].numpy())
    assert any("cut" in n for n in raw.notes) and any("batch of 2" in n for n in raw.notes)


@pytest.mark.parametrize(("audio", "words"), [
    ({"sample_rate": 44100}, "waveform"),
    ({"waveform": torch.zeros(1, 1, 4), "sample_rate": 0}, "sample_rate"),
    ({"waveform": torch.zeros(4), "sample_rate": 8000}, "shape"),
    ({"waveform": torch.full((1, 1, 4), float("nan")), "sample_rate": 8000}, "NaN"),
])
def test_audio_errors(tmp_path, audio, words):
    with pytest.raises(AudioError, match=words):
        write_raw_audio(audio, 1.0, str(tmp_path / "a.f32"))


# ---------------------------------------------------------------- metadata


def test_ffmetadata_escapes_reserved_characters(tmp_path):
    path = tmp_path / "m.txt"
    write_ffmetadata(str(path), {"prompt": 'a=b;c#d\\e\nf'})
    assert path.read_text(encoding="utf-8") == ";FFMETADATA1\nprompt=a\\=b\\;c\\#d\\\\e\\\nf\n"


def test_comfy_metadata_keys():
    tags = comfy_metadata({"1": {"class_type": "X"}}, {"workflow": {"nodes": []}, "extra": 3})
    assert tags == {"prompt": '{"1": {"class_type": "X"}}', "workflow": '{"nodes": []}', "extra": "3"}
    assert comfy_metadata(None, None) == {}


# ---------------------------------------------------------------- formats


class _Build:
    def __init__(self, encoders, muxers=("gif", "webp", "mp4", "webm")):
        self.encoders = frozenset(encoders)
        self.muxers = frozenset(muxers)


def test_formats_listed_only_when_the_build_has_the_encoder():
    build = _Build({"gif", "libwebp_anim", "libx264", "libx265", "libvpx-vp9", "aac"})
    assert [f.name for f in available_formats(build)] == [
        "image/gif", "image/webp", "video/h264-mp4", "video/h265-mp4", "video/webm", "video/vp9-webm"]
    missing = missing_formats(build)
    assert list(missing) == ["video/av1-webm", "video/ProRes", "video/ffv1-mkv", "video/nvenc_h264-mp4",
                             "video/nvenc_hevc-mp4", "image/png", "video/8bit-png", "video/16bit-png"]
    assert "no 'mov' muxer" in missing["video/ProRes"] and "no 'image2' muxer" in missing["image/png"]
    assert "libsvtav1 or libaom-av1" in missing["video/av1-webm"]
    assert "no 'webm' muxer" in missing_formats(_Build({"libvpx-vp9"}, muxers=("mp4",)))["video/vp9-webm"]
    assert set(missing_formats(None)) == {f.name for f in FORMATS}


def test_av1_falls_back_to_libaom():
    assert get_format("video/av1-webm").encoder_for(_Build({"libaom-av1"})).name == "libaom-av1"


@pytest.mark.parametrize(("fmt", "pix_fmt", "crf", "words"), [
    ("video/h264-mp4", "auto", -1, None),
    ("video/h264-mp4", "yuv444p", 0, None),
    ("video/av1-webm", "auto", 0, "outside 1..63"),
    ("video/h264-mp4", "auto", 52, "outside 0..51"),
    ("video/h264-mp4", "yuva420p", -1, "supports pix_fmt"),
    ("image/gif", "yuv420p", -1, None),          # options a format lacks are ignored (a note), not refused
    ("image/webp", "auto", 20, None),
    ("video/mpeg1", "auto", -1, "unknown format"),
    ("video/av1-webm", "auto", -1, "no libsvtav1 or libaom-av1 encoder"),
])
def test_check_choice(fmt, pix_fmt, crf, words):
    build = _Build({"gif", "libwebp_anim", "libx264", "aac"})
    if fmt == "video/av1-webm" and crf == 0:
        build = _Build({"libsvtav1"})
    problem = check_choice(fmt, pix_fmt, crf, build)
    assert problem is None if words is None else words in problem
    assert check_choice("image/gif", "auto", -1, None) is not None


def test_check_choice_uses_the_encoders_pixel_formats():
    assert "cannot encode pix_fmt" in check_choice("video/h264-mp4", "yuv444p", -1, _Build({"libx264"}),
                                                   encoder_pix_fmts=["yuv420p"])


def test_even_size_rule():
    assert needs_even_size("yuv420p") and needs_even_size("yuva420p") and needs_even_size("yuv420p10le")
    assert not needs_even_size("yuv444p") and not needs_even_size(None)


def test_resolve_pix_fmt_picks_alpha_for_vp9_only():
    vp9, h264 = get_format("video/vp9-webm"), get_format("video/h264-mp4")
    assert vp9.resolve_pix_fmt("auto", has_alpha=True) == "yuva420p"
    assert vp9.keeps_alpha("yuva420p") and not vp9.keeps_alpha("yuv420p")
    assert h264.resolve_pix_fmt("auto", has_alpha=True) == "yuv420p" and not h264.keeps_alpha("yuv420p")
    assert get_format("image/webp").keeps_alpha(None) and not get_format("image/gif").keeps_alpha(None)


# ---------------------------------------------------------------- ffmpeg lookup


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\n{body}", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_env_override_wins_and_is_probed(tmp_path, monkeypatch):
    real = ffmpeg_mod.find_ffmpeg()
    wrapper = _script(tmp_path / "ffmpeg-wrapper", f"import os, sys\nos.execv({real.path!r}, [{real.path!r}, *sys.argv[1:]])\n")
    monkeypatch.setenv(ffmpeg_mod.ENV_VAR, wrapper)
    found = ffmpeg_mod.find_ffmpeg()
    assert found.path == os.path.abspath(wrapper) and found.source == ffmpeg_mod.ENV_VAR
    assert found.encoders == real.encoders and found.muxers == real.muxers and found.year == real.year


def test_broken_env_override_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ffmpeg_mod.ENV_VAR, str(tmp_path / "no-such-ffmpeg"))
    with pytest.raises(ffmpeg_mod.FFmpegNotFoundError, match="SLIPSTREAM_FFMPEG=.*not a working ffmpeg"):
        ffmpeg_mod.find_ffmpeg()
    broken = _script(tmp_path / "broken", "import sys\nsys.stderr.write('cannot start\\n')\nsys.exit(3)\n")
    monkeypatch.setenv(ffmpeg_mod.ENV_VAR, broken)
    with pytest.raises(ffmpeg_mod.FFmpegNotFoundError, match="cannot start"):
        ffmpeg_mod.find_ffmpeg()


def test_no_ffmpeg_anywhere_says_where_it_looked(monkeypatch):
    monkeypatch.delenv(ffmpeg_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(ffmpeg_mod, "_imageio_ffmpeg_path", lambda: (None, "imageio-ffmpeg is not installed"))
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ffmpeg_mod.FFmpegNotFoundError) as err:
        ffmpeg_mod.find_ffmpeg()
    assert "imageio-ffmpeg is not installed" in str(err.value) and "no 'ffmpeg' on PATH" in str(err.value)
    assert ffmpeg_mod.find_ffmpeg_or_none()[0] is None


def test_the_build_that_writes_more_formats_wins(tmp_path, monkeypatch):
    real = ffmpeg_mod.find_ffmpeg()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # An ffmpeg on PATH that hides every video encoder: imageio-ffmpeg's full build must win.
    _script(bindir / "ffmpeg", (
        "import os, subprocess, sys\n"
        f"out = subprocess.run([{real.path!r}, *sys.argv[1:]], capture_output=True, text=True)\n"
        "lines = out.stdout.splitlines()\n"
        "if '-encoders' in sys.argv: lines = [l for l in lines if not l.lstrip().startswith('V')]\n"
        "print('\\n'.join(lines)); sys.exit(out.returncode)\n"))
    monkeypatch.delenv(ffmpeg_mod.ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(ffmpeg_mod, "_imageio_ffmpeg_path", lambda: (real.path, ""))
    assert ffmpeg_mod.find_ffmpeg().path == real.path
    monkeypatch.setattr(ffmpeg_mod, "_imageio_ffmpeg_path", lambda: (None, "imageio-ffmpeg is not installed"))
    weak = ffmpeg_mod.find_ffmpeg()
    assert weak.source == "PATH" and available_formats(weak) == []


# ---------------------------------------------------------------- formats at the well-known names


def test_a_hardware_encoder_that_cannot_run_is_not_offered_and_the_error_lists_what_exists():
    build = _Build({"libx264", "h264_nvenc", "aac"})
    build.unusable = (("h264_nvenc", "Cannot load libcuda.so.1"),)
    assert "video/nvenc_h264-mp4" not in [f.name for f in available_formats(build)]
    problem = check_choice("video/nvenc_h264-mp4", "auto", -1, build)
    assert "h264_nvenc (Cannot load libcuda.so.1) but it cannot run here" in problem
    assert "formats this ffmpeg can write: video/h264-mp4" in problem
    assert "no hevc_nvenc encoder" in missing_formats(build)["video/nvenc_hevc-mp4"]
    build.unusable = ()
    assert get_format("video/nvenc_h264-mp4").encoder_for(build).crf_flag == "-cq"


def test_old_format_names_still_resolve_to_the_same_encoding():
    assert get_format("video/vp9-webm").encoders == get_format("video/webm").encoders
    assert get_format("video/8bit-png").kind == get_format("image/png").kind == "images"
    assert get_format("video/16bit-png").input_depth == 16 and get_format("image/png").input_depth == 8


def test_options_a_format_lacks_are_listed_as_ignored():
    build = _Build({"gif", "prores_ks", "libx264"}, muxers=("gif", "mov", "mp4"))
    assert ignored_options("image/gif", "yuv420p", 20, build) == ["pix_fmt yuv420p", "crf 20"]
    assert ignored_options("video/ProRes", "auto", 20, build) == ["crf 20"]
    assert ignored_options("video/h264-mp4", "yuv444p", 20, build) == []
    assert "supports pix_fmt yuv422p10le" in check_choice("video/ProRes", "yuv420p", -1, build)


def test_converter_16_bit_rounds_to_65535_little_endian():
    conv = FrameConverter(1, 3, 3, keep_alpha=False, pad_to_even=True, depth=16)
    frame = torch.tensor([[[0.0, 0.5, 1.0], [1.2, -0.1, 0.25], [0.1, 0.2, 0.3]]])
    out = conv.convert(frame)
    assert conv.pix_fmt == "rgb48le" and out.dtype == np.dtype("<u2") and out.shape == (2, 4, 3)
    want = np.floor(np.clip(frame.double().numpy() * 65535 + 0.5, 0, 65535)).astype(np.uint16)
    assert np.array_equal(out[:1, :3], want)
    assert np.array_equal(out[:1, 3], want[:, 2]) and np.array_equal(out[1], out[0])   # padded by the edge
    assert FrameConverter(1, 1, 4, keep_alpha=True, pad_to_even=False, depth=16).pix_fmt == "rgba64le"


def test_png_text_chunks_are_added_to_a_16_bit_png_without_touching_pixels(tmp_path):
    import zlib

    from slipstream.models.video.metadata import add_png_text, container_tags

    path = tmp_path / "a.png"
    pixels = (np.arange(2 * 3 * 3).reshape(2, 3, 3) * 1000).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in pixels)                      # filter 0 per row

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (3).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    add_png_text(str(path), {"prompt": '{"1": 2}', "note": "猫 cat"})
    data = path.read_bytes()
    assert data[24] == 16                                                       # still 16 bits per channel
    assert b"tEXtprompt\0{\"1\": 2}" in data and b"iTXtnote\0\0\0\0\0" + "猫 cat".encode() in data
    from PIL import Image
    with Image.open(path) as im:
        assert im.text["prompt"] == '{"1": 2}' and im.text["note"] == "猫 cat"
    tags = container_tags({"prompt": "{}", "workflow": "[1]"})
    assert tags["prompt"] == "{}" and json.loads(tags["comment"]) == {"prompt": "{}", "workflow": "[1]"}
    assert container_tags({}) == {}
