"""In-process scenario for the Wan Sampler inside ComfyUI (run by inprocess_boot.py): latent previews
go through ComfyUI's previewer with the Wan latent format. Returns plain data for
tests/integration/test_comfyui_wan_sampler.py."""

from __future__ import annotations


def sampler_previews(ctx) -> dict:
    import importlib
    from dataclasses import replace

    import comfy.utils
    import torch
    from comfy.cli_args import LatentPreviewMethod, args

    args.preview_method = LatentPreviewMethod.Latent2RGB
    config = importlib.import_module(f"{ctx.pack.__name__}.models.wan.config")
    dit_mod = importlib.import_module(f"{ctx.pack.__name__}.models.wan.dit")
    pipe = importlib.import_module(f"{ctx.pack.__name__}.models.wan.pipeline")
    cfg = replace(config.tiny("t2v", text_dim=32), text_len=16)
    dit = dit_mod.WanDiT(cfg).eval().requires_grad_(False)
    dit.load_state_dict(dit_mod.random_state_dict(cfg, seed=1))
    handle = pipe.WanModelHandle(dit, "tiny", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    text = pipe.WanTextEmbeds((torch.randn(5, 32, generator=g),), torch.randn(3, 32, generator=g))
    seen: list[list] = []

    def hook(value, total, preview, node_id=None):
        seen.append([value, total, None if preview is None else [preview[0], list(preview[1].size)]])

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        sampler = ctx.pack.NODE_CLASS_MAPPINGS["SlipstreamWanSampler"]()
        latent, denoised = sampler.sample(handle, pipe.WanImageEmbeds(64, 48, 5), text, 3, 4.0, 5.0, 1, "euler",
                                          1.0, True, "auto")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    return {"host": ctx.pack_module("host").NAME, "updates": seen,
            "shapes": [list(latent["samples"].shape), list(denoised["samples"].shape)]}
