"""Video Combine's newer inputs end to end in the standalone host: png sequences published as whole folders,
save_metadata, trim_to_audio, latent + vae decoded in chunks, webp lossless by default, switching formats."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from slipstream import host
from slipstream.host import paths
from slipstream.host.standalone import Interrupted
from slipstream.models.video.spool import FrameSpool, SpoolError
from slipstream.nodes.video import SlipstreamVideoCombine

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from test_video_encode import container_tags  # noqa: E402
from test_video_node import PROMPT, WORKFLOW, all_files, count_frames, frames  # noqa: E402


def combine(images=None, fmt="video/h264-mp4", prefix="video/test", **kw):
    args = {"frame_rate": 8.0, "loop_count": 0, "filename_prefix": prefix, "format": fmt, "pingpong": False,
            "save_output": True, "crf": -1, "pix_fmt": "auto", "lossless": True, "quality": 90}
    args.update(kw)
    if images is None and "latent" not in kw:
        images = frames()
    return SlipstreamVideoCombine().combine(images, prompt=PROMPT, extra_pnginfo=WORKFLOW, **args)


# ---------------------------------------------------------------- png sequences


def test_png_sequence_is_a_numbered_folder_with_the_workflow_in_its_first_frame(workdirs):
    target = workdirs["output"] / "video"
    target.mkdir()
    (target / "test_00001_").mkdir()                       # someone's folder under the first name
    (target / "test_00001_" / "00001.png").write_bytes(b"theirs")
    out = combine(fmt="video/16bit-png", pingpong=True)
    files = out["result"][0]
    folder = target / "test_00002_"
    assert files == [str(folder / f"{i:05d}.png") for i in range(1, 11)]
    assert (target / "test_00001_" / "00001.png").read_bytes() == b"theirs"
    assert out["ui"] == {"images": [{"filename": "00001.png", "subfolder": "video/test_00002_", "type": "output"}],
                         "animated": (False,)}
    with Image.open(files[0]) as im:
        assert json.loads(im.text["prompt"]) == PROMPT and json.loads(im.text["workflow"]) == WORKFLOW["workflow"]
    assert open(files[0], "rb").read(25)[24] == 16
    assert all_files(workdirs["output"]) == sorted(
        ["video/test_00001_/00001.png"] + [f"video/test_00002_/{i:05d}.png" for i in range(1, 11)])
    video = out["result"][1]
    assert video.get_frame_count() == 10 and video.get_dimensions() == (48, 32)


def test_png_sequence_shares_the_counter_with_other_files(workdirs):
    first = combine()["result"][0]                           # test_00001_.png + test_00001_.mp4
    second = combine(fmt="image/png")["result"][0]
    assert os.path.basename(first[1]) == "test_00001_.mp4"
    assert os.path.basename(os.path.dirname(second[0])) == "test_00002_"


def test_interrupted_png_sequence_leaves_no_folder(workdirs, monkeypatch):
    import slipstream.nodes.video as node_module

    class CancelAtThirdFrame(host.ProgressBar):
        def update_absolute(self, value, total=None, preview=None):
            if value == 3:
                host.request_interrupt()
            super().update_absolute(value, total, preview)

    monkeypatch.setattr(node_module, "ProgressBar", CancelAtThirdFrame)
    try:
        with pytest.raises(Interrupted):
            combine(frames(20), fmt="image/png")
    finally:
        host.clear_stale_interrupt()
    assert not list((workdirs["output"] / "video").iterdir())     # neither the staged folder nor a final one


def test_publish_folder_never_replaces_and_stale_staged_folders_are_swept(tmp_path):
    target = paths.save_target(str(tmp_path), "seq/clip", "output")
    with paths.staged_folder(target) as staged:
        open(os.path.join(staged, "00001.png"), "wb").close()
        os.makedirs(tmp_path / "seq" / "clip_00001_")
        final = paths.publish_folder(staged, target, counter=1)
    assert os.path.basename(final) == "clip_00002_" and os.listdir(final) == ["00001.png"]
    assert sorted(os.listdir(tmp_path / "seq")) == ["clip_00001_", "clip_00002_"]
    with pytest.raises(RuntimeError), paths.staged_folder(target) as staged:
        raise RuntimeError("encoder failed")
    assert not os.path.exists(staged)
    old = tmp_path / "seq" / ".clip.abcd1234.partial.frames"
    old.mkdir()
    (old / "00001.png").write_bytes(b"x")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert paths.sweep_stale_partials(str(tmp_path / "seq")) == [str(old)] and not old.exists()


# ---------------------------------------------------------------- metadata, audio, defaults, switching formats


@pytest.mark.parametrize("fmt", ["video/h264-mp4", "image/png"])
def test_save_metadata_off_writes_no_workflow(workdirs, fmt):
    files = combine(fmt=fmt, save_metadata=False)["result"][0]
    if fmt == "video/h264-mp4":
        assert len(files) == 1                                   # no first-frame PNG beside the video
        assert "workflow" not in container_tags(files[0]) and "comment" not in container_tags(files[0])
    else:
        with Image.open(files[0]) as im:
            assert "prompt" not in im.text and "workflow" not in im.text


def test_trim_to_audio_through_the_node(workdirs):
    tone = {"waveform": torch.sin(torch.arange(4000) * 0.3).view(1, 1, -1), "sample_rate": 8000}   # 0.5 s
    video = combine(frames(12), trim_to_audio=True, audio=tone)["result"][0][1]
    assert count_frames(video) == 4
    assert count_frames(combine(frames(12), audio=tone)["result"][0][1]) == 12


def test_webp_is_lossless_by_default_and_old_workflows_keep_their_choice(workdirs):
    optional = SlipstreamVideoCombine.INPUT_TYPES()["optional"]
    assert optional["lossless"][1]["default"] is True
    images = frames(3)
    lossless = combine(images, fmt="image/webp")["result"][0][1]
    with Image.open(lossless) as im:
        first = np.asarray(im.convert("RGB"))
    assert np.array_equal(first, (images[0].numpy() * 255 + 0.5).astype(np.uint8))
    lossy = combine(images, fmt="image/webp", lossless=False, quality=10)["result"][0][1]
    assert os.path.getsize(lossy) < os.path.getsize(lossless)


def test_switching_format_keeps_working_with_the_other_formats_options(workdirs):
    notes = []
    host.add_notice_hook(lambda node, message: notes.append(message))
    out = combine(fmt="video/ProRes", crf=30, pix_fmt="auto")          # crf left from an h264 setting
    assert count_frames(out["result"][0][1]) == 6
    combine(fmt="image/gif", crf=30, pix_fmt="yuv444p")
    assert any("has no crf option; crf 30 was not used" in n for n in notes)
    assert any("pix_fmt yuv444p, crf 30 was not used" in n for n in notes)


def test_new_inputs_are_optional_so_old_prompts_stay_valid():
    types = SlipstreamVideoCombine.INPUT_TYPES()
    old_widgets = ["frame_rate", "loop_count", "filename_prefix", "format", "pingpong", "save_output", "crf",
                   "pix_fmt", "lossless", "quality", "save_metadata", "trim_to_audio", "decode_chunk"]
    # The frontend makes widgets in input order, required first: saved widgets_values map by that order.
    inputs = {**types["required"], **types["optional"]}
    widgets = [name for name, spec in inputs.items() if isinstance(spec[0], list) or spec[0] in (
        "INT", "FLOAT", "STRING", "BOOLEAN")]
    assert widgets == old_widgets
    # Inputs only some formats have are optional: a prompt for gif need not carry crf or pix_fmt.
    assert {"crf", "pix_fmt", "lossless", "quality"} <= set(types["optional"])
    assert {"images", "audio", "save_metadata", "trim_to_audio", "latent", "vae", "decode_chunk"} <= set(
        types["optional"])
    formats = types["required"]["format"][0]
    for name in ("video/webm", "video/vp9-webm", "video/h264-mp4", "image/png", "video/16bit-png"):
        assert name in formats
    for spec in [*types["required"].values(), *types["optional"].values()]:
        assert spec[1].get("tooltip")


# ---------------------------------------------------------------- latent + vae


class StandInVAE:
    """The part of ComfyUI's VAE the node uses: decode(samples) -> pixels, channels last.

    Image latents [B,4,h,w] give [B,8h,8w,3]; video latents [B,4,T,h,w] give [B,T,8h,8w,3], as core's
    VAE.decode returns them. The pixels are a fixed function of the latent (sigmoid of the first three
    channels, upsampled 8×), so chunked and whole decodes can be compared.
    """

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(samples.shape))
        pixels = torch.sigmoid(samples[:, :3]).repeat_interleave(8, -1).repeat_interleave(8, -2)
        return pixels.movedim(1, -1)


def test_latent_is_decoded_in_chunks_and_matches_one_whole_decode(workdirs, monkeypatch):
    import slipstream.nodes.video as node_module

    seen = {}
    monkeypatch.setattr(node_module, "video_value", lambda path, **kw: seen.update(kw) or "VIDEO")
    latent = {"samples": torch.randn(7, 4, 4, 6)}
    vae = StandInVAE()
    out = combine(fmt="image/gif", latent=latent, vae=vae, decode_chunk=3, pingpong=True)
    assert vae.calls == [(3, 4, 4, 6), (3, 4, 4, 6), (1, 4, 4, 6)]
    whole = StandInVAE().decode(latent["samples"])
    assert torch.equal(seen["frames"](), whole[[0, 1, 2, 3, 4, 5, 6, 5, 4, 3, 2, 1]])
    assert count_frames(out["result"][0][1]) == 12
    with Image.open(out["result"][0][0]) as im:                           # the workflow PNG is decoded frame 0
        assert im.size == (48, 32)
        assert np.array_equal(np.asarray(im.convert("RGB")), (whole[0].numpy() * 255 + 0.5).astype(np.uint8))


def test_video_latent_is_decoded_one_clip_at_a_time(workdirs):
    vae = StandInVAE()
    out = combine(fmt="video/h264-mp4", latent={"samples": torch.randn(2, 4, 5, 4, 4)}, vae=vae, decode_chunk=2)
    assert vae.calls == [(1, 4, 5, 4, 4), (1, 4, 5, 4, 4)]
    assert count_frames(out["result"][0][1]) == 10


@pytest.mark.parametrize(("kw", "words"), [
    ({"images": "both"}, "both images and latent"),
    ({"vae": None}, "needs the vae input"),
    ({"latent": None}, "nothing to encode"),
    ({"latent": {"samples": torch.zeros(2, 4)}}, "latent must be a LATENT"),
    ({"vae": object()}, "must be ComfyUI's VAE"),
])
def test_latent_input_errors_say_what_to_connect(workdirs, kw, words):
    args = {"latent": {"samples": torch.randn(2, 4, 4, 4)}, "vae": StandInVAE(), **kw}
    images = frames() if args.pop("images", None) == "both" else None
    with pytest.raises((ValueError, TypeError), match=words):
        SlipstreamVideoCombine().combine(images, 8.0, 0, "video/test", "video/h264-mp4", **args)
    assert all_files(workdirs["output"]) == []


def test_spool_keeps_chunks_on_disk_and_refuses_a_size_change():
    spool = FrameSpool()
    a, b = torch.rand(2, 4, 6, 3), torch.rand(3, 4, 6, 3).double()
    spool.append(a)
    spool.append(b)
    spooled = spool.frames()
    spool.close()
    assert spooled.shape == (5, 4, 6, 3) and spooled.dtype == torch.float32
    assert torch.equal(spooled, torch.cat([a, b.float()]))
    other = FrameSpool()
    other.append(a)
    with pytest.raises(SpoolError, match="changed size"):
        other.append(torch.rand(1, 4, 5, 3))
    with pytest.raises(SpoolError, match="no frames"):
        FrameSpool().frames()
