"""In-process scenarios for the Anima family, run inside ComfyUI by inprocess_boot.py.

Not a test module: it runs under COMFYUI_PYTHON with ComfyUI imported (inference mode on, as the
executor runs nodes) and returns plain data that tests/integration/test_comfyui_anima.py checks.
"""

from __future__ import annotations


def train_and_patch(ctx) -> dict:
    """Our loaders -> trainer -> patch node on ComfyUI's own objects; ComfyUI's apply_model before/after."""
    import comfy.model_management as mm
    import folder_paths
    import torch

    # This ComfyUI's folder_paths may not follow the boot's base directory: name ours explicitly.
    for key in ("diffusion_models", "text_encoders", "vae"):
        folder_paths.add_model_folder_path(key, str(ctx.models / key), is_default=True)
    folder_paths.set_input_directory(str(ctx.input))
    nodes = ctx.pack.NODE_CLASS_MAPPINGS
    p = ctx.params
    out: dict = {"host": ctx.pack_module("host").NAME}
    with torch.inference_mode():
        (model,) = nodes["SlipstreamAnimaModelLoader"]().load(p["dit"], "default")
        (clip,) = nodes["SlipstreamAnimaTextEncoderLoader"]().load(p["text_encoder"])
        (vae,) = nodes["SlipstreamAnimaVAELoader"]().load(p["vae"])
        image, _ = nodes["SlipstreamLoadReferenceImage"]().load(p["image"])
        dm = model.model.diffusion_model
        out["model_types"] = [type(model).__module__ + "." + type(model).__name__, type(model.model).__name__,
                              [c.__module__ + "." + c.__name__ for c in type(dm).__mro__[:2]]]
        out["vae_type"] = type(vae).__module__ + "." + type(vae).__name__
        before = {k: v.clone() for k, v in dm.state_dict().items()}
        context, info = nodes["AnimaFastTrainReferenceContext"]().train(
            model, clip, vae, image, "1girl, solo", 0, 6, 0.02, 128, 4, 0.02, "fp32")
        after = dm.state_dict()
        out["weights_unchanged"] = all(torch.equal(after[k], v) for k, v in before.items())
        out["tokens_shape"] = list(context.tokens.shape)
        out["info"] = info

        def denoise(m) -> torch.Tensor:
            mm.load_models_gpu([m], force_full_load=True)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(1, 16, 1, 16, 16, generator=g)
            c = torch.randn(1, 512, context.context_dim, generator=g)
            return m.model.apply_model(x, torch.tensor([0.6]), c_crossattn=c).clone()

        patch = nodes["AnimaFastTrainPatchModel"]()
        base = denoise(model)
        off = denoise(patch.patch(model, context, 0.0)[0])
        on = denoise(patch.patch(model, context, 1.0)[0])
        again = denoise(model)
    out["scale0_equal"] = bool(torch.equal(off, base))
    out["scale1_diff"] = float((on - base).abs().max())
    out["unpatched_again_equal"] = bool(torch.equal(again, base))
    return out
