"""The Wan Sampler inside a real ComfyUI: previews through ComfyUI's latent previewer."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_wan_sampler_sends_latent_previews(comfy_inprocess):
    out = comfy_inprocess.run(HERE / "scenarios_wan_sampler.py", "sampler_previews")
    assert out["host"] == "comfyui"
    assert [u[:2] for u in out["updates"]] == [[1, 3], [2, 3], [3, 3]]
    # Latent2RGB: one JPEG per step
    assert all(u[2] is not None and u[2][0] == "JPEG" for u in out["updates"]), out["updates"]
    assert out["shapes"] == [[1, 16, 2, 6, 8], [1, 16, 2, 6, 8]]
