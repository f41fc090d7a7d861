"""In-process scenarios for Wan 2.2, run inside ComfyUI by inprocess_boot.py.

Not a test module: it runs under COMFYUI_PYTHON with ComfyUI imported and returns plain data that
tests/integration/test_comfyui_wan22.py checks. ComfyUI's Wan code (comfy/ldm/wan) is a port of
the official Wan 2.2 modules, so identical random weights through both is the numerics check.
"""

from __future__ import annotations


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def matches_comfyui_reference(ctx) -> dict:
    """Our Wan 2.2 VAE, TI2V DiT (per-token timesteps) and A14B I2V expert against ComfyUI's own code."""
    import comfy.latent_formats
    import comfy.ops
    import torch
    from comfy.ldm.wan.model import WanModel
    from comfy.ldm.wan.vae2_2 import WanVAE as CoreVAE22

    pack = ctx.pack.__name__
    vae22 = __import__(f"{pack}.models.wan.vae22", fromlist=["x"])
    latents = __import__(f"{pack}.models.wan.latents", fromlist=["x"])
    config = __import__(f"{pack}.models.wan.config", fromlist=["x"])
    dit = __import__(f"{pack}.models.wan.dit", fromlist=["x"])
    out: dict = {}
    with torch.inference_mode():
        cfg = vae22.TINY_VAE22
        theirs = CoreVAE22(dim=cfg.dim, dec_dim=cfg.dec_dim, z_dim=cfg.z_dim,
                           temperal_downsample=list(cfg.temporal_downsample)).float()
        g = torch.Generator().manual_seed(0)
        sd = {k: torch.randn(v.shape, generator=g) * (0.3 if v.dim() > 1 else 0.1) + (1.0 if k.endswith("gamma") else 0.0)
              for k, v in theirs.state_dict().items()}
        missing, unexpected = theirs.load_state_dict(sd, strict=True)
        out["vae_keys_match"] = not missing and not unexpected
        ours = vae22.Wan22VAE.from_state_dict(dict(sd), dtype=torch.float32)
        video = torch.rand(1, 3, 9, 64, 48, generator=g) * 2 - 1
        z_theirs, z_ours = theirs.encode(video), ours.encode(video)
        out["vae_encode_rel"] = _rel(z_ours, z_theirs)
        out["vae_decode_rel"] = _rel(ours.decode(z_theirs), theirs.decode(z_theirs).clamp(-1, 1))
        fmt = comfy.latent_formats.Wan22()
        out["latent_format_rel"] = _rel(latents.normalize_latent(z_theirs), fmt.process_in(z_theirs))

        for name, cfg in (("ti2v", config.tiny("ti2v", text_dim=64)),
                          ("i2v_a14b", config.tiny("i2v", text_dim=64, image_context=False))):
            sd = dit.random_state_dict(cfg, seed=1)
            theirs = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=cfg.in_dim, dim=cfg.dim,
                              ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim,
                              num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                              operations=comfy.ops.disable_weight_init, dtype=torch.float32)
            missing, unexpected = theirs.load_state_dict(sd, strict=True)
            out[f"{name}_keys_match"] = not missing and not unexpected
            ours = dit.WanDiT.from_state_dict(sd)
            x = torch.randn(1, cfg.out_dim, 3, 4, 6, generator=g)
            ctx_text = torch.randn(1, 512, cfg.text_dim, generator=g)
            if name == "ti2v":   # the first latent frame given: ComfyUI's per-frame timesteps [B, F]
                mask = torch.ones(1, 1, 3, 4, 6)
                mask[:, :, 0] = 0
                mine = ours(x, torch.tensor([700.0]), ctx_text, denoise_mask=mask)
                core = theirs(x, torch.tensor([[0.0, 700.0, 700.0]]), ctx_text)
            else:
                y = torch.randn(1, cfg.cond_channels, 3, 4, 6, generator=g)
                mine = ours(x, torch.tensor([700.0]), ctx_text, y=y)
                core = theirs(torch.cat([x, y], dim=1), torch.tensor([700.0]), ctx_text)
            out[f"{name}_rel"] = _rel(mine, core)
    return out
