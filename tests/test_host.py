"""The standalone host: model folders, output naming that never overwrites, progress and interrupt."""

from __future__ import annotations

import os
import time

import pytest
from slipstream import host
from slipstream.host import paths


def test_standalone_host_selected():
    assert host.NAME == "standalone"


def test_model_listing_and_lookup(workdirs):
    unet = workdirs["models"] / "diffusion_models" / "wan"
    unet.mkdir(parents=True)
    (unet / "wan2.1_t2v_1.3B_fp16.safetensors").write_bytes(b"x")
    (workdirs["models"] / "unet").mkdir()
    (workdirs["models"] / "unet" / "legacy.ckpt").write_bytes(b"x")
    (workdirs["models"] / "unet" / "notes.txt").write_text("not a model")
    assert host.list_models("diffusion_models") == ["legacy.ckpt", "wan/wan2.1_t2v_1.3B_fp16.safetensors"]
    assert host.model_path("diffusion_models", "wan/wan2.1_t2v_1.3B_fp16.safetensors").endswith(
        os.path.join("wan", "wan2.1_t2v_1.3B_fp16.safetensors"))
    with pytest.raises(host.ModelNotFoundError, match="Close matches: wan/wan2.1_t2v_1.3B_fp16.safetensors"):
        host.model_path("diffusion_models", "wan/wan2.1_t2v_1.3B_bf16.safetensors")
    with pytest.raises(host.ModelNotFoundError, match="folder is empty"):
        host.model_path("vae", "wan_2.1_vae.safetensors")
    with pytest.raises(host.ModelNotFoundError):
        host.model_path("diffusion_models", "../../etc/passwd")


def test_registered_folder_uses_its_extensions(workdirs):
    host.register_model_folder("slip_test_folder", "slip_test", {".pth", ".safetensors"})
    d = workdirs["models"] / "slip_test"
    d.mkdir()
    for name in ("a.pth", "b.safetensors", "c.bin"):
        (d / name).write_bytes(b"x")
    assert host.list_models("slip_test_folder") == ["a.pth", "b.safetensors"]


def test_several_model_roots(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "loras").mkdir(parents=True)
    (b / "loras").mkdir(parents=True)
    (a / "loras" / "one.safetensors").write_bytes(b"1")
    (b / "loras" / "two.safetensors").write_bytes(b"2")
    monkeypatch.setenv("SLIPSTREAM_MODELS", f"{a}{os.pathsep}{b}")
    assert host.list_models("loras") == ["one.safetensors", "two.safetensors"]


def test_prefix_patterns():
    now = time.struct_time((2026, 3, 4, 5, 6, 7, 0, 63, 0))
    assert paths.expand_prefix("video/%date:yyyy-MM-dd%/clip", now=now) == "video/2026-03-04/clip"
    assert paths.expand_prefix("%date:hhmmss%_%year%%month%%day%_%width%x%height%", 640, 480, now) == \
        "050607_20260304_640x480"
    assert paths.expand_prefix("plain") == "plain"


def test_save_target_subfolders_and_escapes(workdirs):
    target = host.save_target("video/Slip")
    assert target.subfolder == "video" and target.stem == "Slip" and target.folder_type == "output"
    assert target.directory == str(workdirs["output"] / "video")
    assert host.save_target("x", temp=True).folder_type == "temp"
    for bad in ("../outside", "/abs/path", "video/.."):
        with pytest.raises(ValueError):
            host.save_target(bad)


def test_publish_numbers_and_never_overwrites(workdirs):
    target = host.save_target("clips/demo")
    written = []
    for payload in (b"first", b"second"):
        with host.staged_file(target, "mp4") as tmp:
            with open(tmp, "wb") as f:
                f.write(payload)
            written.append(host.publish(tmp, target, "mp4"))
    assert [os.path.basename(p) for p in written] == ["demo_00001_.mp4", "demo_00002_.mp4"]
    # A name taken meanwhile (another writer) is skipped, not replaced.
    (workdirs["output"] / "clips" / "demo_00003_.mp4").write_bytes(b"someone else's")
    with host.staged_file(target, "mp4") as tmp:
        open(tmp, "wb").write(b"third")
        third = host.publish(tmp, target, "mp4", counter=3)
    assert os.path.basename(third) == "demo_00004_.mp4"
    assert (workdirs["output"] / "clips" / "demo_00003_.mp4").read_bytes() == b"someone else's"
    assert sorted(os.listdir(workdirs["output"] / "clips")) == [
        "demo_00001_.mp4", "demo_00002_.mp4", "demo_00003_.mp4", "demo_00004_.mp4"]
    assert host.ui_file(third, target) == {"filename": "demo_00004_.mp4", "subfolder": "clips", "type": "output"}


def test_counter_of_reads_back_the_published_number(workdirs):
    target = host.save_target("clips/demo_x")
    assert host.counter_of(paths.numbered_name("demo_x", 7, "mp4"), target) == 7
    assert host.counter_of("/any/dir/demo_x_123456_.glb", target) == 123456
    assert host.counter_of("demo_x_00007_.mp4", host.save_target("clips/demo")) is None
    assert host.counter_of("other_00007_.mp4", target) is None


def test_failed_write_leaves_nothing(workdirs):
    target = host.save_target("fail/x")
    with pytest.raises(RuntimeError):
        with host.staged_file(target, "gif") as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("encoder died")
    assert os.listdir(workdirs["output"] / "fail") == []


def test_progress_hooks_and_interrupt():
    seen = []
    remove = host.add_progress_hook(lambda v, t: seen.append((v, t)))
    try:
        bar = host.ProgressBar(3)
        bar.update()
        bar.update_absolute(5)  # clamped to total
        host.request_interrupt()
        with pytest.raises(host.interrupt_exception_types()):
            bar.update()
        bar.update_absolute(1)  # the request is consumed by the raise
    finally:
        remove()
    assert seen[:2] == [(1, 3), (3, 3)]


def test_devices_on_cpu(monkeypatch):
    monkeypatch.setenv("SLIPSTREAM_DEVICE", "cpu")
    assert host.compute_device().type == "cpu"
    assert host.offload_device().type == "cpu"
    assert host.vram_info() is None


def test_defaults_avoid_the_packages_own_models_folder(monkeypatch, tmp_path):
    from slipstream.host import standalone

    for var in ("SLIPSTREAM_MODELS", "SLIPSTREAM_OUTPUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert standalone.models_roots() == [str(tmp_path / "models")]
    monkeypatch.chdir(standalone._PACKAGE_ROOT)
    assert standalone.models_roots() == [os.path.join(standalone._PACKAGE_ROOT, "slipstream-data", "models")]


def test_saved_models_in_output_are_listed_like_comfyui(workdirs):
    saved = workdirs["output"] / "diffusion_models"
    saved.mkdir()
    (saved / "mine_int8.safetensors").write_bytes(b"x")
    assert host.list_models("diffusion_models") == ["mine_int8.safetensors"]
    assert host.model_path("diffusion_models", "mine_int8.safetensors") == str(saved / "mine_int8.safetensors")
