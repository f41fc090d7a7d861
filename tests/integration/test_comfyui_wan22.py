"""Wan 2.2 inside a real ComfyUI: our Wan 2.2 VAE, TI2V-5B DiT and A14B I2V expert give ComfyUI's own
results on identical random weights (its comfy/ldm/wan code ports the official modules), and our
latent statistics are its `latent_formats.Wan22`. The example workflows run in test_comfyui_demos.py."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_wan22_models_match_comfyuis_reference_code(comfy_inprocess):
    result = comfy_inprocess.run(HERE / "scenarios_wan22.py", "matches_comfyui_reference")
    assert result["vae_keys_match"] and result["ti2v_keys_match"] and result["i2v_a14b_keys_match"], result
    for key in ("vae_encode_rel", "vae_decode_rel", "latent_format_rel", "ti2v_rel", "i2v_a14b_rel"):
        assert result[key] <= 1e-4, result
