"""In-process scenarios for Video Combine, run inside ComfyUI by inprocess_boot.py.

Not a test module: it runs under COMFYUI_PYTHON with ComfyUI imported, and returns plain data that
tests/integration/test_comfyui_video.py checks.
"""

from __future__ import annotations


def latent_through_core_vae(ctx) -> dict:
    """A real core VAE (TAESD's architecture, random weights) decodes a LATENT through Video Combine in chunks."""
    import comfy.sd
    import comfy.taesd.taesd
    import torch

    torch.manual_seed(0)
    # Core builds TAESD with weight init disabled (its layers expect a checkpoint): fill in small random weights.
    keys = comfy.taesd.taesd.TAESD(latent_channels=4).state_dict()
    sd = {k: (torch.randn(v.shape) * 0.05 if v.is_floating_point() and v.ndim > 0 else v) for k, v in keys.items()}
    vae = comfy.sd.VAE(sd=sd)
    latent = {"samples": torch.randn(7, 4, 6, 8)}
    node = ctx.pack.NODE_CLASS_MAPPINGS["SlipstreamVideoCombine"]
    whole = vae.decode(latent["samples"])
    chunked = node._frames(None, latent, vae, 3)
    out = node().combine(None, 8.0, 0, "slip_video/latent", "image/png", latent=latent, vae=vae, decode_chunk=3)
    files = out["result"][0]
    return {"vae_type": type(vae).__name__, "frames": int(chunked.shape[0]), "files": len(files),
            "size": [int(chunked.shape[2]), int(chunked.shape[1])],
            "chunked_equals_whole": bool(torch.allclose(chunked, whole.float(), atol=1e-5)),
            "max_diff": float((chunked - whole.float()).abs().max())}
