"""A Wan model as ComfyUI's own MODEL: core's Wan architecture, our int8/fp8 Linear layers.

Why ComfyUI builds it (and we do not wrap our own module): core's KSampler, ModelSamplingSD3, LoRA
loaders and Wan conditioning nodes (WanImageToVideo, WanVaceToVideo, ...) talk to `WAN21`'s
`extra_conds`, its key names and `transformer_options`; ComfyUI's own module honours all of them,
and an adapter around ours would have to copy that contract and follow it version by version. So the
file is loaded a second time, by ComfyUI's loader, with the operations class of host/comfy_quant.py
(the same one "Load Diffusion Model INT8 (W8A8)" uses) and the storage plan the Wan loader used.

Block swap: kernels/blockswap_replace.py, set as per-block `patches_replace["dit"]` patches on a
clone, and an ON_LOAD callback that parks the swapped blocks on the offload device after ComfyUI
loaded the model (ComfyUI's memory accounting still counts them, so it never over-commits).
"""

from __future__ import annotations

import comfy.lora
import comfy.lora_convert
import comfy.model_base
import comfy.model_management as mm
import comfy.sd
from comfy.patcher_extension import CallbacksMP

from ..kernels.blockswap_replace import ModuleBlockSwap
from ..kernels.quant_layer import QuantPlan, QuantReport
from .comfy_quant import make_operations

SWAP_CALLBACK_KEY = "slipstream_wan_block_swap"


class CoreArchitectureError(ValueError):
    """ComfyUI has no Wan architecture for this file."""


def core_wan_model(sd: dict, plan: QuantPlan, dtype, metadata: dict | None = None, on_layer=None):
    """(MODEL, QuantReport): ComfyUI's Wan model from `sd`, its Linears stored as `plan` says and the other
    weights in `dtype` (the Wan loader's base precision)."""
    report = QuantReport()
    options = {"custom_operations": make_operations(plan, report, on_layer), "dtype": dtype}
    if plan.fp8_fast:
        options["fp8_optimizations"] = True
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, metadata=metadata)
    if patcher is None:
        raise CoreArchitectureError(
            "ComfyUI recognises no architecture in this file's keys, so it cannot build a core MODEL from it. "
            "Save the model with official or ComfyUI key names (e.g. through 'Save INT8 Model'), or keep it on "
            "the Wan Sampler.")
    if not isinstance(patcher.model, comfy.model_base.WAN21):
        raise CoreArchitectureError(
            f"ComfyUI reads this file as {type(patcher.model).__name__}, not as a Wan model. Connect a Wan 2.1 / "
            "2.2 diffusion model, or use this ComfyUI's own loader for that family.")
    return patcher, report


def add_lora(model, lora_sd: dict, strength: float, keep) -> tuple[object, int, int]:
    """(clone with the LoRA's patches, patches kept, LoRA modules found): core's own LoRA path (the one
    LoraLoaderModelOnly takes) with a block selection: `keep(model_key) -> bool`."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora_sd), key_map, log_missing=False)
    kept = {key: patch for key, patch in loaded.items() if keep(key if isinstance(key, str) else key[0])}
    clone = model.clone()
    added = clone.add_patches(kept, strength)
    return clone, len(added), len(loaded)


def block_swap(model, swapped: tuple[int, ...], prefetch: int, non_blocking: bool):
    """(clone whose swapped blocks live on the offload device between runs, the swap state)."""
    clone = model.clone()
    blocks = clone.get_model_object("diffusion_model").blocks
    swap = ModuleBlockSwap(blocks, swapped, clone.load_device, clone.offload_device, prefetch=prefetch,
                           non_blocking=non_blocking and mm.device_supports_non_blocking(clone.load_device))
    for index in swap.swapped:
        clone.set_model_patch_replace(swap.patch(index), "dit", "double_block", index)

    def park(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load):
        if device_to is not None and device_to == patcher.load_device:
            swap.park()

    clone.add_callback_with_key(CallbacksMP.ON_LOAD, SWAP_CALLBACK_KEY, park)
    return clone, swap
