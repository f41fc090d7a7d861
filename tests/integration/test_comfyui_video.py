"""Video Combine inside a real ComfyUI: core images in, files + core preview out, its VIDEO into core SaveVideo;
the formats at the well-known Video Combine names (ProRes, png sequences), save_metadata, and a LATENT decoded in
chunks through a real core VAE."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import imageio_ffmpeg
import pytest
from PIL import Image

FRAMES = 8
HERE = Path(__file__).parent


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
        tags = _tags(written)
        assert "prompt=" in tags and "slipstreamvideocombine" in tags
        assert "comment={" in tags                        # the whole metadata as one JSON, as VHS writes it


def _tags(path) -> str:
    return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata",
                           "-"], capture_output=True, text=True, check=True).stdout.lower()


@pytest.mark.parametrize(("fmt", "ext"), [("video/ProRes", "mov"), ("video/webm", "webm")])
def test_video_combine_writes_the_well_known_names(comfyui, fmt, ext):
    prefix = f"slip_video/named_{ext}"
    entry = comfyui.run(_graph(fmt, prefix, save_metadata=True))
    item = entry["outputs"]["2"]["images"][0]
    written = comfyui.output_dir / item["subfolder"] / item["filename"]
    assert written.suffix == f".{ext}" and _frame_count(written) == 2 * FRAMES - 2
    assert "comment={" in _tags(written) and "slipstreamvideocombine" in _tags(written)
    core = entry["outputs"]["3"]["images"][0]
    assert _frame_count(comfyui.output_dir / core["subfolder"] / core["filename"]) == 2 * FRAMES - 2


@pytest.mark.parametrize(("fmt", "depth"), [("image/png", 8), ("video/16bit-png", 16)])
def test_png_sequence_folder_with_the_workflow_in_its_first_frame(comfyui, fmt, depth):
    prefix = f"slip_video/seq{depth}"
    entry = comfyui.run(_graph(fmt, prefix))
    ours = entry["outputs"]["2"]
    item = ours["images"][0]
    assert ours["animated"] == [False] and item["filename"] == "00001.png"
    folder = comfyui.output_dir / item["subfolder"]
    assert folder.parent.name == "slip_video" and folder.name.endswith("_")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{i:05d}.png" for i in range(1, 2 * FRAMES - 1)]
    assert (folder / "00001.png").read_bytes()[24] == depth
    with Image.open(folder / "00001.png") as im:
        assert json.loads(im.text["prompt"])["2"]["inputs"]["format"] == fmt
    assert not [p for p in folder.parent.iterdir() if ".partial." in p.name]
    core = entry["outputs"]["3"]["images"][0]
    assert _frame_count(comfyui.output_dir / core["subfolder"] / core["filename"]) == 2 * FRAMES - 2


def test_save_metadata_off_leaves_the_workflow_out(comfyui):
    entry = comfyui.run(_graph("video/h264-mp4", "slip_video/nometa", save_metadata=False))
    item = entry["outputs"]["2"]["images"][0]
    written = comfyui.output_dir / item["subfolder"] / item["filename"]
    assert "prompt=" not in _tags(written) and "comment=" not in _tags(written)
    assert not written.with_suffix(".png").exists()


def test_latent_through_a_core_vae_in_chunks(comfy_inprocess):
    out = comfy_inprocess.run(HERE / "scenarios_video.py", "latent_through_core_vae")
    assert out.get("vae_type") == "VAE" and out["chunked_equals_whole"], out
    assert out["frames"] == 7 and out["files"] == 7 and out["size"] == [64, 48]


def test_bad_option_is_refused_with_the_reason_before_anything_is_written(comfyui, harness_module):
    """A pix_fmt the format cannot carry is refused when the node starts (VALIDATE_INPUTS names only
    filename_prefix, since ComfyUI files its answer under every input it names), and nothing is written."""
    with pytest.raises(harness_module.ComfyError, match="supports pix_fmt yuv420p10le, yuv420p"):
        comfyui.run(_graph("video/av1-webm", "slip_video/bad", pix_fmt="yuv444p"))
    assert not list(comfyui.output_dir.glob("slip_video/bad*"))
