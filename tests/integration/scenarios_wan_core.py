"""In-process scenarios for Wan Model to core MODEL and core text encoding, run inside ComfyUI by
inprocess_boot.py; tests/integration/test_comfyui_wan_core.py checks the plain data they return.

Text comes from core's real CLIPLoader (type "wan") and CLIPTextEncode on a tiny umT5 file with the
real key names and 4096 wide (what core's umT5-XXL detection reads). Core builds its umT5 from the
`umt5_config_xxl.json` that sits next to comfy/text_encoders/wan.py, which would make a 5.7B-parameter
model; inside these scenarios only, that module's `__file__` is pointed at a temporary folder holding a
tiny config of the same form (24 layers, 2 heads of 8, ffn 16, vocabulary 320), so the rest of the
loading and encoding code runs unchanged. The module attribute is restored afterwards.
"""

from __future__ import annotations

import json
from contextlib import contextmanager


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _use_scenario_folders(ctx) -> None:
    """ComfyUI's model folders at the scenario's base directory (folder_paths is imported before
    --base-directory can be honoured)."""
    import folder_paths

    for key in ("diffusion_models", "loras", "text_encoders", "vae"):
        (ctx.models / key).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(key, str(ctx.models / key), is_default=True)


@contextmanager
def tiny_umt5_config(ctx):
    """Core's umT5 model reads the tiny config written from ctx.params["umt5_config"] (see module docstring)."""
    import comfy.text_encoders.wan as core_wan

    folder = ctx.base / "tiny_umt5_config"
    folder.mkdir(exist_ok=True)
    (folder / "umt5_config_xxl.json").write_text(json.dumps(ctx.params["umt5_config"]))
    original = core_wan.__file__
    core_wan.__file__ = str(folder / "wan.py")
    try:
        yield
    finally:
        core_wan.__file__ = original


def _core_text(ctx, prompts):
    """(CLIP, [CONDITIONING per prompt]) through core CLIPLoader(type wan) and CLIPTextEncode."""
    import nodes

    with tiny_umt5_config(ctx):
        (clip,) = nodes.CLIPLoader().load_clip(ctx.params["umt5_file"], "wan")
        return clip, [nodes.CLIPTextEncode().encode(clip, text)[0] for text in prompts]


def _layer_kinds(module) -> dict:
    from collections import Counter

    return dict(Counter(m.layer_kind for m in module.modules() if hasattr(m, "layer_kind")))


def core_model(ctx) -> dict:
    """Our loader (int8, block swap) -> Wan Model to core MODEL -> core ModelSamplingSD3 -> core KSampler
    with core text conditioning; then core LoraLoaderModelOnly on it, and a loader-merged LoRA."""
    import comfy.model_management
    import torch
    from comfy.patcher_extension import CallbacksMP
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    import nodes

    _use_scenario_folders(ctx)
    p = ctx.params
    n = ctx.pack.NODE_CLASS_MAPPINGS
    loader, bridge = n["SlipstreamWanModelLoader"](), n["SlipstreamWanToCoreModel"]()
    kernels = ctx.pack_module("kernels.int8")
    out: dict = {"host": ctx.pack_module("host").NAME}

    (swap_args,) = n["SlipstreamWanBlockSwap"]().make(1, False, False, True, 1)
    (handle,) = loader.load(p["dit_file"], "fp32", "int8_w8a8", "offload_device", block_swap_args=swap_args)
    (core,) = bridge.convert(handle)
    dm = core.model.diffusion_model
    out["model_class"] = type(core.model).__name__
    out["kinds"] = _layer_kinds(dm)
    out["q_layer_class"] = type(dm.blocks[0].self_attn.q).__qualname__
    out["q_layer_module"] = type(dm.blocks[0].self_attn.q).__module__
    out["head_kind"] = dm.head.head.layer_kind
    out["text_embedding_kind"] = dm.text_embedding[0].layer_kind
    replace = core.model_options["transformer_options"]["patches_replace"]["dit"]
    out["swap_patches"] = sorted([name, index] for name, index in replace)
    swap = next(iter(replace.values())).swap
    out["on_load_callbacks"] = len(core.get_all_callbacks(CallbacksMP.ON_LOAD))

    (shifted,) = ModelSamplingSD3().patch(core, 5.0)
    out["shift"] = float(shifted.get_model_object("model_sampling").shift)
    _, (pos, neg) = _core_text(ctx, ["a red fox runs through fresh snow", "blurry"])
    out["cond_shape"] = list(pos[0][0].shape)
    latent = {"samples": torch.zeros(1, 16, 2, 6, 8)}
    before = kernels.backend_calls()
    (sampled,) = nodes.common_ksampler(shifted, 1, 2, 4.0, "euler", "simple", pos, neg, latent)
    after = kernels.backend_calls()
    out["int8_calls"] = sum(after[k] - before.get(k, 0) for k in after)
    out["sample_shape"] = list(sampled["samples"].shape)
    out["sample_finite"] = bool(torch.isfinite(sampled["samples"]).all())
    out["swap_runs"] = [[i, list(resident)] for i, resident in swap.log.runs]
    out["swap_moves"] = [swap.log.moves_in, swap.log.moves_out]
    out["swap_resident_after"] = sorted(swap.resident)
    out["swap_moves_real"] = swap.moves_real

    # a load device ComfyUI books apart from the offload one (cpu:0, as a GPU would be): the ON_LOAD
    # callback parks the swapped block and the patches really call Module.to; the result is unchanged
    twin = shifted.clone()
    twin.load_device = torch.device("cpu", 0)
    twin, real_swap = ctx.pack_module("host").core_block_swap(twin, (0,), 0, False)
    parks: list[int] = []
    park = real_swap.park
    real_swap.park = lambda: (parks.append(1), park())[1]
    moved: list[str] = []
    move = real_swap._move
    real_swap._move = lambda module, device, nb: (moved.append(str(device)), move(module, device, nb))[1]
    comfy.model_management.unload_all_models()        # loaded afresh: ComfyUI's load runs ON_LOAD
    (twin_sample,) = nodes.common_ksampler(twin, 1, 2, 4.0, "euler", "simple", pos, neg, latent)
    out["real_swap"] = {"moves_real": real_swap.moves_real, "parks": len(parks), "moved": moved,
                        "runs": [[i, list(r)] for i, r in real_swap.log.runs],
                        "same_sample": bool(torch.equal(twin_sample["samples"], sampled["samples"]))}

    # the same file as core's own float model: our int8 layers stay close to it
    (float_model,) = nodes.UNETLoader().load_unet(p["dit_file"], "default")
    (float_shifted,) = ModelSamplingSD3().patch(float_model, 5.0)
    (reference,) = nodes.common_ksampler(float_shifted, 1, 2, 4.0, "euler", "simple", pos, neg, latent)
    out["rel_vs_core_float"] = _rel(sampled["samples"], reference["samples"])

    # core LoraLoaderModelOnly on the bridged MODEL: core patches reach our int8 layers, swap stays
    (lora_model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(shifted, p["lora_file"], 1.0)
    out["core_lora_patches"] = len(lora_model.patches)
    out["core_lora_keeps_swap"] = ("double_block", 1) in \
        lora_model.model_options["transformer_options"]["patches_replace"]["dit"]
    (with_lora,) = nodes.common_ksampler(lora_model, 1, 2, 4.0, "euler", "simple", pos, neg, latent)
    out["core_lora_changes_sample"] = _rel(with_lora["samples"], sampled["samples"])
    out["core_lora_finite"] = bool(torch.isfinite(with_lora["samples"]).all())

    # a LoRA merged by the loader (block 0 only) becomes core patches with the same selection
    (chain,) = n["SlipstreamWanLoraSelect"]().select(p["lora_file"], 0.7, None, "0")
    (handle2,) = loader.load(p["dit_file"], "fp32", "fp8_e4m3fn", "offload_device", lora=chain)
    (core2,) = bridge.convert(handle2)
    out["recorded_lora_patches"] = sorted(k if isinstance(k, str) else k[0] for k in core2.patches)
    out["recorded_lora_strengths"] = sorted({v[0][0] for v in core2.patches.values()})
    out["fp8_kinds"] = _layer_kinds(core2.model.diffusion_model)
    out["fp8_q_dtype"] = str(core2.model.diffusion_model.blocks[0].self_attn.q.weight.dtype)
    out["fp8_head_dtype"] = str(core2.model.diffusion_model.head.head.weight.dtype)
    return out


def core_text_to_our_sampler(ctx) -> dict:
    """Core CLIPLoader(umT5, wan) -> CLIPTextEncode -> Wan Text Embeds from Conditioning -> Wan Sampler."""
    import torch

    _use_scenario_folders(ctx)
    p = ctx.params
    n = ctx.pack.NODE_CLASS_MAPPINGS
    clip, (pos, neg, other) = _core_text(ctx, ["a red fox runs through fresh snow", "blurry",
                                               "waves roll onto a quiet beach at sunset"])
    tokens = clip.tokenize("a red fox runs through fresh snow")["umt5xxl"][0]
    out: dict = {"host": ctx.pack_module("host").NAME, "cond_shape": list(pos[0][0].shape),
                 "prompt_tokens": sum(1 for t in tokens if (t[0] if isinstance(t, tuple) else t) != 0)}
    bridge = n["SlipstreamWanTextEmbedsFromConditioning"]()
    (embeds,) = bridge.convert(pos, neg)
    out["positive_shapes"] = [list(t.shape) for t in embeds.positive]
    out["negative_shape"] = list(embeds.negative.shape)
    length = embeds.positive[0].shape[0]
    out["embeds_are_the_conditioning"] = bool(torch.equal(embeds.positive[0], pos[0][0][0, :length].to(
        embeds.positive[0].dtype)))
    (handle,) = n["SlipstreamWanModelLoader"]().load(p["dit_file"], "fp32", "disabled", "main_device")
    (empty,) = n["SlipstreamWanEmptyEmbeds"]().make(64, 48, 5)
    sampler = n["SlipstreamWanSampler"]()
    latent, _ = sampler.sample(handle, empty, embeds, 2, 4.0, 5.0, 1, "euler", 1.0, True, "auto")
    (other_embeds,) = bridge.convert(other, neg)
    other_latent, _ = sampler.sample(handle, empty, other_embeds, 2, 4.0, 5.0, 1, "euler", 1.0, True, "auto")
    out["latent_shape"] = list(latent["samples"].shape)
    out["latent_finite"] = bool(torch.isfinite(latent["samples"]).all())
    out["prompt_changes_video"] = _rel(other_latent["samples"], latent["samples"])
    return out


def core_image_to_video(ctx) -> dict:
    """A Wan 2.1 I2V file through our loader (int8) -> Wan Model to core MODEL -> ModelSamplingSD3 -> core
    KSampler, fed by core WanImageToVideo (start image through core VAELoader's Wan VAE) and core text."""
    import torch
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfy_extras.nodes_wan import WanImageToVideo

    import nodes

    _use_scenario_folders(ctx)
    p = ctx.params
    n = ctx.pack.NODE_CLASS_MAPPINGS
    (handle,) = n["SlipstreamWanModelLoader"]().load(p["i2v_file"], "fp32", "int8_w8a8", "offload_device")
    (core,) = n["SlipstreamWanToCoreModel"]().convert(handle)
    dm = core.model.diffusion_model
    out: dict = {"host": ctx.pack_module("host").NAME, "model_class": type(core.model).__name__,
                 "image_to_video": bool(core.model.image_to_video), "kinds": _layer_kinds(dm),
                 "patch_in_channels": int(dm.patch_embedding.weight.shape[1])}
    seen: list[int] = []
    hook = dm.patch_embedding.register_forward_pre_hook(lambda module, args: seen.append(int(args[0].shape[1])))
    concat: list[list[int]] = []

    def record_concat(apply_model, args):
        c_concat = args["c"].get("c_concat")
        concat.append(list(c_concat.shape) if c_concat is not None else [])
        return apply_model(args["input"], args["timestep"], **args["c"])

    core.set_model_unet_function_wrapper(record_concat)
    (shifted,) = ModelSamplingSD3().patch(core, 8.0)
    _, (pos, neg) = _core_text(ctx, ["a red fox runs through fresh snow", "blurry"])
    (vae,) = nodes.VAELoader().load_vae(p["vae_file"])
    g = torch.Generator().manual_seed(7)
    samples = []
    for _ in range(2):       # two different start images: the image must reach the sample
        start = torch.rand(1, 48, 64, 3, generator=g)
        i2v_pos, i2v_neg, latent = WanImageToVideo.execute(pos, neg, vae, 64, 48, 5, 1, start_image=start).result
        (sampled,) = nodes.common_ksampler(shifted, 1, 2, 5.0, "euler", "simple", i2v_pos, i2v_neg, latent)
        samples.append(sampled["samples"])
    hook.remove()
    out["cond_concat_image"] = list(i2v_pos[0][1]["concat_latent_image"].shape)
    out["cond_concat_mask"] = list(i2v_pos[0][1]["concat_mask"].shape)
    out["latent_shape"] = list(latent["samples"].shape)
    out["c_concat"] = concat
    out["seen_channels"] = seen
    out["sample_shape"] = list(samples[0].shape)
    out["sample_finite"] = all(bool(torch.isfinite(s).all()) for s in samples)
    out["start_image_changes_sample"] = _rel(samples[1], samples[0])
    return out
