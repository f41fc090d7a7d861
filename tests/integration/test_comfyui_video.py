"""Video Combine inside a real ComfyUI: core images in, files + core preview out, its VIDEO into core SaveVideo."""

from __future__ import annotations

import json
import subprocess

import imageio_ffmpeg
import pytest
from PIL import Image

FRAMES = 8


def _graph(fmt: str, prefix: str, **options) -> dict:
    combine = {"images": ["1", 0], "frame_rate": 8.0, "loop_count": 0, "filename_prefix": prefix, "format": fmt,
               "pingpong": True, "save_output": True, "crf": -1, "pix_fmt": "auto", "lossless": False, "quality": 90}
    combine.update(options)
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": FRAMES,
                                                    "color": 0x3366CC}},
        "2": {"class_type": "SlipstreamVideoCombine", "inputs": combine},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 1], "filename_prefix": f"{prefix}_core",
                                                   "format": "auto", "codec": "auto"}},
    }


def _frame_count(path) -> int:
    gen = imageio_ffmpeg.read_frames(str(path))
    next(gen)
    return sum(1 for _ in gen)


@pytest.mark.parametrize("fmt", ["video/h264-mp4", "video/vp9-webm", "image/gif", "image/webp"])
def test_video_combine_feeds_core_save_video(comfyui, fmt):
    prefix = f"slip_video/{fmt.replace('/', '_')}"
    entry = comfyui.run(_graph(fmt, prefix))
    ours, core = entry["outputs"]["2"], entry["outputs"]["3"]
    assert ours["animated"] == [True] and len(ours["images"]) == 1       # core's animated preview, no custom JS
    item = ours["images"][0]
    ext = fmt.split("-")[-1] if fmt.startswith("video/") else fmt.split("/")[1]
    assert item["type"] == "output" and item["subfolder"] == "slip_video" and item["filename"].endswith(f"_.{ext}")
    written = comfyui.output_dir / item["subfolder"] / item["filename"]
    if fmt == "image/webp":     # libwebp merges identical frames (EmptyImage's) into one: count via the VIDEO
        with Image.open(written) as im:
            assert im.format == "WEBP" and im.size == (64, 48)
    else:
        assert _frame_count(written) == 2 * FRAMES - 2
    png = written.with_suffix(".png")
    with Image.open(png) as im:
        assert json.loads(im.text["prompt"])["2"]["class_type"] == "SlipstreamVideoCombine"
    core_file = comfyui.output_dir / core["images"][0]["subfolder"] / core["images"][0]["filename"]
    assert _frame_count(core_file) == 2 * FRAMES - 2                    # our VIDEO value is usable by core
    if fmt.startswith("video/"):
        tags = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(written), "-f",
                               "ffmetadata", "-"], capture_output=True, text=True, check=True).stdout.lower()
        assert "prompt=" in tags and "slipstreamvideocombine" in tags


def test_bad_option_is_refused_with_the_reason_before_anything_is_written(comfyui, harness_module):
    """A pix_fmt the format cannot carry is refused when the node starts (VALIDATE_INPUTS names only
    filename_prefix, since ComfyUI files its answer under every input it names), and nothing is written."""
    with pytest.raises(harness_module.ComfyError, match="supports pix_fmt yuv420p10le, yuv420p"):
        comfyui.run(_graph("video/av1-webm", "slip_video/bad", pix_fmt="yuv444p"))
    assert not list(comfyui.output_dir.glob("slip_video/bad*"))
