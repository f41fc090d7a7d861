"""The memory nodes inside a real ComfyUI, with a real core CLIP (ComfyUI's own CLIPLoader)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
CLIP_FILE = "slipstream_tiny_clip_l.safetensors"


def write_tiny_clip_l(models_dir: Path) -> Path:
    """One real CLIP-L key: enough for ComfyUI's loader to build an SD1 CLIP (the rest stays random)."""
    path = models_dir / "text_encoders" / CLIP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        torch.manual_seed(0)
        save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(3072, 768).half()}, str(path))
    return path


def test_offload_clip_workflow_through_prompt(comfyui, harness_module):
    """CLIPLoader -> CLIPTextEncode -> Offload CLIP (trigger) -> Memory Cleanup (its dram_id) -> previews."""
    write_tiny_clip_l(comfyui.models_dir)
    api = {
        "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["1", 0]}},
        "3": {"class_type": "ArchAi3D_Offload_CLIP", "inputs": {"clip": ["1", 0], "trigger": ["2", 0]}},
        "4": {"class_type": "SlipstreamMemoryCleanup",
              "inputs": {"clear": "key", "target": ["3", 1], "empty_device_cache": True, "trigger": ["3", 2]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    entry = comfyui.run(api)
    (offload_stats,) = harness_module.ui_texts(entry, "5")
    (cleanup_stats,) = harness_module.ui_texts(entry, "6")
    (dram_id,) = harness_module.ui_texts(entry, "7")
    print(offload_stats, cleanup_stats, sep="\n")
    assert "Offload: nothing freed: load and offload device are both cpu" in offload_stats
    assert "Mode: vram_state=DISABLED" in offload_stats
    assert "SD1ClipModel on cpu" in offload_stats
    assert dram_id.startswith("clip:weights:SD1ClipModel@") and dram_id in offload_stats
    assert "Cleanup: dropped 1 entry" in cleanup_stats and dram_id in cleanup_stats
    # Re-queueing the same graph is served from ComfyUI's cache: no volatile IS_CHANGED anywhere.
    again = comfyui.run(api)
    cached = [m for m in again["status"]["messages"] if m[0] == "execution_cached"]
    assert cached and {"1", "2", "3", "4"} <= set(cached[0][1]["nodes"])


def test_offload_core_clip_in_process(comfy_inprocess):
    write_tiny_clip_l(comfy_inprocess.models_dir)
    out = comfy_inprocess.run(HERE / "scenarios_memory.py", "offload_core_clip", {"clip_file": CLIP_FILE})
    print(out["cpu"]["stats"], out["device"]["stats"], out["cleanup"], sep="\n")
    assert out["host"] == "comfyui"

    cpu = out["cpu"]
    assert "nothing freed: load and offload device are both cpu" in cpu["stats"]
    assert cpu["passthrough_is_trigger"] and cpu["key"].startswith("clip:weights:SD1ClipModel@")
    assert cpu["loaded_after"] == cpu["loaded_before"]            # nothing was touched

    dev = out["device"]
    assert [m for m in dev["loaded_before"] if m[1] == "cpu:0" and m[2] > 0], dev["loaded_before"]
    assert "Offload: freed 235.8 MiB on cpu:0; weights now on cpu [method: free_memory(keep_loaded=others)]" \
        in dev["stats"]
    assert not [m for m in dev["loaded_after"] if m[1] == "cpu:0"]          # ComfyUI's entry was popped
    assert [m for m in dev["loaded_after"] if m[1] == "cpu"] == [m for m in dev["loaded_before"] if m[1] == "cpu"]
    assert dev["clone_key"] == dev["key"]
    assert dev["reloaded_bytes"] > 0                                   # ComfyUI brought it back by itself
    assert dev["weights_unchanged"] and dev["same_result"]
    assert "Cleanup: dropped 1 entry" in out["cleanup"]


@pytest.mark.parametrize("node_id", ["ArchAi3D_Offload_CLIP", "SlipstreamMemoryCleanup"])
def test_memory_nodes_have_no_is_changed(node_id, slip_nodes):
    slipstream, _ = slip_nodes
    assert not hasattr(slipstream.NODE_CLASS_MAPPINGS[node_id], "IS_CHANGED")
