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
        clip.encode_from_tokens(clip.tokenize("1girl"), return_dict=True)
        out["clip_patcher"] = type(clip.patcher).__module__ + "." + type(clip.patcher).__name__
        out["clip_managed"] = any(lm.model is clip.patcher for lm in mm.current_loaded_models)
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


def matches_comfyui_reference(ctx) -> dict:
    """Our DiT, Qwen3 encoder and tokenizers against ComfyUI's own code and the files it ships."""
    import dataclasses
    import os

    import comfy.ops
    import torch
    from comfy.ldm.cosmos.predict2 import MiniTrainDIT
    from comfy.text_encoders import llama
    from transformers import Qwen2Tokenizer, T5TokenizerFast

    pack = ctx.pack.__name__
    dit_mod = __import__(f"{pack}.models.anima.dit", fromlist=["x"])
    tiny = __import__(f"{pack}.models.anima.tiny", fromlist=["x"])
    toks = __import__(f"{pack}.models.anima.tokenizers", fromlist=["x"])
    qwen3 = __import__(f"{pack}.models.anima.qwen3", fromlist=["x"])
    out: dict = {}
    with torch.inference_mode():
        ours = tiny.tiny_dit(seed=4, std=0.1)
        theirs = MiniTrainDIT(**dit_mod.comfy_dit_kwargs(ours.config), operations=comfy.ops.disable_weight_init)
        sd = {k: v for k, v in ours.state_dict().items() if not k.startswith("llm_adapter.")}
        missing, unexpected = theirs.load_state_dict(sd, strict=False)
        out["dit_keys_match"] = not missing and not unexpected
        g = torch.Generator().manual_seed(0)
        x, c = torch.randn(2, 16, 1, 8, 12, generator=g), torch.randn(2, 20, ours.config.crossattn_emb_channels, generator=g)
        t = torch.tensor([0.25, 0.8])
        out["dit_max_diff"] = float((ours(x, t, c) - theirs(x, t, c)).abs().max())

        enc = tiny.randomize(qwen3.Qwen3Encoder(tiny.TINY_QWEN), 3, std=0.2)
        cfg = llama.Qwen3_4BConfig(**{f.name: getattr(tiny.TINY_QWEN, f.name) for f in dataclasses.fields(tiny.TINY_QWEN)
                                      if f.name in llama.Qwen3_4BConfig.__dataclass_fields__})
        cfg.head_dim = tiny.TINY_QWEN.head_dim
        ref = llama.Llama2_(cfg, ops=comfy.ops.disable_weight_init)
        ref.load_state_dict({k.removeprefix("model."): v for k, v in enc.state_dict().items()}, strict=True)
        ids = torch.randint(0, tiny.TINY_QWEN.vocab_size, (1, 9), generator=g)
        out["qwen3_max_diff"] = float((enc(ids) - ref(ids)[0]).abs().max())

    folder = os.path.join(os.path.dirname(comfy.ops.__file__), "text_encoders")
    q_ours = toks.ByteLevelBPE.from_dir(os.path.join(folder, "qwen25_tokenizer"))
    t_ours = toks.Unigram.from_dir(os.path.join(folder, "t5_tokenizer"))
    q_ref = Qwen2Tokenizer.from_pretrained(os.path.join(folder, "qwen25_tokenizer"))
    t_ref = T5TokenizerFast.from_pretrained(os.path.join(folder, "t5_tokenizer"))
    mismatches = []
    for text in ctx.params["prompts"]:
        if q_ours.encode(text) != q_ref(text)["input_ids"]:
            mismatches.append(["qwen", text])
        if t_ours.encode(text) != t_ref(text)["input_ids"]:
            mismatches.append(["t5", text])
    out["tokenizer_mismatches"] = mismatches
    return out
