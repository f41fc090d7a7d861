"""In-process scenarios for the memory family, run inside ComfyUI by inprocess_boot.py.

Not a test module: it runs under COMFYUI_PYTHON with ComfyUI imported, and returns plain data
that tests/integration/test_comfyui_memory.py checks.
"""

from __future__ import annotations


def _quiet_load_clip(path: str, **kw):
    """ComfyUI's CLIP loader; its 'clip missing' warning (our file holds one key) is expected noise."""
    import logging

    import comfy.sd

    logging.disable(logging.WARNING)
    try:
        return comfy.sd.load_clip([path], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, **kw)
    finally:
        logging.disable(logging.NOTSET)


def _loaded(mm) -> list[list]:
    return [[type(lm.model.model).__name__, str(lm.device), int(lm.model_loaded_memory())]
            for lm in mm.current_loaded_models if lm.model is not None]


def offload_core_clip(ctx) -> dict:
    """A CLIP from ComfyUI's own loader, encoded by core CLIPTextEncode, offloaded by our node."""
    import comfy.model_management as mm
    import torch

    import nodes

    offload = ctx.pack.NODE_CLASS_MAPPINGS["ArchAi3D_Offload_CLIP"]()
    cleanup = ctx.pack.NODE_CLASS_MAPPINGS["SlipstreamMemoryCleanup"]()
    path = str(ctx.models / "text_encoders" / ctx.params["clip_file"])
    out: dict = {"host": ctx.pack_module("host").NAME}

    # 1. ComfyUI on the CPU (--cpu): load device == offload device, nothing can be freed.
    clip = _quiet_load_clip(path)
    (cond,) = nodes.CLIPTextEncode().encode(clip, "a red cube")
    before = _loaded(mm)
    stats, key, passthrough, _ = offload.offload(clip, trigger=cond)
    out["cpu"] = {"stats": stats, "key": key, "passthrough_is_trigger": passthrough is cond,
                  "loaded_before": before, "loaded_after": _loaded(mm)}

    # 2. A separate load device. A CPU-only machine has no GPU, so "cpu:0" stands in for one:
    # ComfyUI books it as a different device, so its real LoadedModel / free_memory(keep_loaded) /
    # detach path runs exactly as it would for cuda:0 (the bytes stay in the same RAM, of course).
    clip2 = _quiet_load_clip(path, model_options={"load_device": torch.device("cpu", 0),
                                                  "offload_device": torch.device("cpu")})
    lora_like = clip2.clone()                       # what a LoRA / clip-skip node would hand on
    (cond2,) = nodes.CLIPTextEncode().encode(lora_like, "a blue sphere")
    weights = {k: v.clone() for k, v in clip2.cond_stage_model.state_dict().items()}
    before = _loaded(mm)
    stats2, key2, _, _ = offload.offload(clip2, trigger=cond2)   # the base handle; ComfyUI loaded the clone
    after = _loaded(mm)
    _, key3, _, _ = offload.offload(lora_like, trigger=cond2)    # the clone resolves to the same key
    (cond3,) = nodes.CLIPTextEncode().encode(lora_like, "a blue sphere")   # ComfyUI loads it back
    out["device"] = {
        "stats": stats2, "key": key2, "clone_key": key3, "loaded_before": before, "loaded_after": after,
        "reloaded_bytes": int(lora_like.patcher.loaded_size()),
        # Weights the loader left unset are uninitialised (may hold NaN): compare bits, and outputs NaN-aware.
        "weights_unchanged": all(torch.equal(weights[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
                                 for k, v in clip2.cond_stage_model.state_dict().items()),
        "same_result": bool(torch.equal(torch.nan_to_num(cond2[0][0]), torch.nan_to_num(cond3[0][0]))),
    }
    cleanup_stats, _ = cleanup.cleanup("key", key2, True, trigger=None)
    out["cleanup"] = cleanup_stats
    return out


def keyed_clip_reuse(ctx) -> dict:
    """Load CLIP (keyed) against core Load CLIP, counting every file ComfyUI's loader reads.

    comfy.sd.load_clip reads each text-encoder file through comfy.utils.load_torch_file, so wrapping
    that function sees every disk read of a CLIP file, whoever asks for it.
    """
    import gc
    import os
    import weakref

    import comfy.utils
    import folder_paths
    import torch

    import nodes

    folder_paths.add_model_folder_path("text_encoders", str(ctx.models / "text_encoders"))  # ComfyUI's own lookup
    name = ctx.params["clip_file"]
    keyed = ctx.pack.NODE_CLASS_MAPPINGS["SlipstreamCLIPLoaderKeyed"]()
    offload = ctx.pack.NODE_CLASS_MAPPINGS["ArchAi3D_Offload_CLIP"]()
    reads: list[str] = []
    original = comfy.utils.load_torch_file

    def counting(ckpt, *args, **kwargs):
        reads.append(os.path.basename(str(ckpt)))
        return original(ckpt, *args, **kwargs)

    comfy.utils.load_torch_file = counting
    out: dict = {"host": ctx.pack_module("host").NAME}
    try:
        # 1. The keyed loader: the first run reads the file; after Offload CLIP, the next one does not.
        (clip,) = keyed.load_clip(name, "stable_diffusion")
        out["clip_class"] = f"{type(clip).__module__}.{type(clip).__qualname__}"
        (cond,) = nodes.CLIPTextEncode().encode(clip, "a red cube")
        first_stats, first_key, _, _ = offload.offload(clip, trigger=cond)
        out["reads_first"] = list(reads)
        probe = weakref.ref(clip)
        del clip, cond
        gc.collect()
        (again,) = keyed.load_clip(name, "stable_diffusion")
        (cond2,) = nodes.CLIPTextEncode().encode(again, "a red cube")
        second_stats, second_key, _, _ = offload.offload(again, trigger=cond2)
        out.update(reads_second=reads[len(out["reads_first"]):], first_key=first_key, second_key=second_key,
                   is_changed=keyed.IS_CHANGED(name, "stable_diffusion"), same_object=probe() is again,
                   second_stats=second_stats, first_stats=first_stats,
                   cond_finite=bool(torch.isfinite(cond2[0][0]).all()))
        del again, cond2

        # 2. Core Load CLIP: every load reads the file, and every load gets the same weights key,
        # even while a LoRA-style patch sits in the weights in place.
        before = len(reads)
        (core1,) = nodes.CLIPLoader().load_clip(name, "stable_diffusion")
        _, core_key1, _, _ = offload.offload(core1, trigger=1)
        (core2,) = nodes.CLIPLoader().load_clip(name, "stable_diffusion")
        weight = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        patched = core2.clone()
        patched.add_patches({weight: (torch.full((3072, 768), 0.01),)}, 1.0)
        nodes.CLIPTextEncode().encode(patched, "a blue sphere")          # ComfyUI patches the weight in place
        in_place = not torch.equal(core2.cond_stage_model.state_dict()[weight], core1.cond_stage_model.state_dict()[weight])
        _, core_key2, _, _ = offload.offload(patched, trigger=1)
        out.update(core_reads=reads[before:], core_key1=core_key1, core_key2=core_key2, patched_in_place=in_place)
    finally:
        comfy.utils.load_torch_file = original
    return out
