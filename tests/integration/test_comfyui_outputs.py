"""What users meet in a real ComfyUI: output files readable by others, like core Save Image's, and Offload
CLIP's clip output feeding a core CLIPTextEncode after the offload."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from test_comfyui_memory import CLIP_FILE, write_tiny_clip_l  # noqa: E402


def test_video_combine_files_get_the_same_mode_as_core_save_image(comfyui, harness_module):
    api = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 3, "color": 0}},
        "2": {"class_type": "SlipstreamVideoCombine",
              "inputs": {"images": ["1", 0], "frame_rate": 8.0, "loop_count": 0, "filename_prefix": "modes/clip",
                         "format": "image/gif", "pingpong": True, "save_output": True, "crf": -1,
                         "pix_fmt": "auto", "lossless": False, "quality": 90}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "modes/core"}},
    }
    entry = comfyui.run(api)
    files = harness_module.output_files(entry, comfyui.base)
    ours = [f for f in files if os.path.basename(str(f)).startswith("clip_")]
    core = [f for f in files if os.path.basename(str(f)).startswith("core_")]
    assert ours and core
    core_mode = stat.S_IMODE(os.stat(core[0]).st_mode)
    assert core_mode & stat.S_IROTH, "core SaveImage output should be world-readable under the default umask"
    assert {stat.S_IMODE(os.stat(f).st_mode) for f in ours} == {core_mode}


def test_offload_clip_output_feeds_core_clip_text_encode(comfyui, harness_module):
    write_tiny_clip_l(comfyui.models_dir)
    api = {
        "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["1", 0]}},
        "3": {"class_type": "ArchAi3D_Offload_CLIP", "inputs": {"clip": ["1", 0], "trigger": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue sphere", "clip": ["3", 3]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }
    entry = comfyui.run(api)
    assert entry["status"]["status_str"] == "success"
    assert harness_module.ui_texts(entry, "5")
