"""MIA rigging inside a real ComfyUI: the five networks live under ComfyUI's model management."""

from __future__ import annotations

from pathlib import Path

from slipstream.models.mia.humanoid import write_demo_assets

HERE = Path(__file__).resolve().parent


def test_mia_networks_are_loaded_counted_and_freed_by_comfyui(comfy_inprocess):
    write_demo_assets(str(comfy_inprocess.models_dir / "mia"),
                      str(comfy_inprocess.base_dir / "input" / "3d" / "mia_demo_humanoid.glb"))
    out = comfy_inprocess.run(HERE / "scenarios_mia.py", "networks_are_managed",
                              {"mesh": "3d/mia_demo_humanoid.glb"})
    assert out["host"] == "comfyui"
    assert out["patchers"] == ["comfy.model_patcher.ModelPatcher"]
    assert out["before_rig"] == []          # loading the networks does not put them anywhere ComfyUI cannot see
    assert out["managed"] == ["bw", "bw_normal", "joints", "joints_coarse", "pose"]
    assert out["counted_bytes"] == out["weight_bytes"] > 0
    assert out["after_unload"] == []
