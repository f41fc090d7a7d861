"""Wan Model to core MODEL: our Wan model handed to ComfyUI's own samplers and Wan nodes.

ComfyUI loads the same file through its own Wan architecture, with our int8/fp8 Linear layers and
the storage, LoRAs and block swap the Wan Model Loader recorded (models/wan/core_source.py; why a
second load and not a wrapper: host/comfy_wan.py).
"""

from __future__ import annotations

import logging

from ..host import (
    ProgressBar,
    compute_device,
    core_block_swap,
    core_lora,
    core_wan_model,
    model_path,
    notice,
)
from ..kernels.blockswap import swap_indices
from ..kernels.precision import resolve_dtype
from ..models.checkpoint import load_state_dict
from ..models.wan.core_source import (
    CoreBridgeError,
    LoraRecord,
    check_core_compatible,
    keep_patch,
    prepare_core_load,
)
from .wan import CATEGORY

log = logging.getLogger("slipstream.wan")
NODE = "Wan Model to core MODEL"


def lora_records(handle) -> tuple[LoraRecord, ...]:
    """The LoRAs merged at load and those of Wan Apply LoRA, in the order the Wan Sampler applies them."""
    run_time = tuple(LoraRecord(r.name, model_path("loras", r.name), r.strength, r.blocks)
                     for r in handle.runtime_loras)
    return handle.source.loras + run_time


class WanToCoreModel:
    DESCRIPTION = ("Hands a model from the Wan Model Loader to ComfyUI's own nodes: core KSampler / "
                   "SamplerCustom, ModelSamplingSD3, LoraLoaderModelOnly and the core Wan conditioning nodes "
                   "(WanImageToVideo, WanVaceToVideo, ...). ComfyUI loads the same file through its own Wan "
                   "architecture with this pack's int8 / fp8 layers, the loader's LoRAs (merged and Wan Apply "
                   "LoRA ones) become core LoRA patches, and block swap moves each swapped block to the GPU "
                   "just before it runs. The weights are read a second time: set the Wan Model Loader's "
                   "load_device to offload_device when only core nodes use the model.")
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("ComfyUI's own Wan MODEL (WAN21 / WAN22) with int8/fp8 layers, LoRAs and block swap as "
                       "loaded; for KSampler, ModelSamplingSD3 and core LoRA loaders.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("SLIP_WAN_MODEL", {"tooltip": "From the Wan Model Loader (or Wan Apply LoRA). Its file, "
                                                    "precision, quantization and LoRAs are used; GGUF files and "
                                                    "attached speech models cannot go to core nodes."}),
        }, "optional": {
            "block_swap_args": ("SLIP_BLOCKSWAP_ARGS", {
                "tooltip": "From Wan Block Swap (optional): overrides the loader's block swap for the core "
                           "MODEL. Without it the loader's setting is used; blocks_to_swap 0 turns it off."}),
        }}

    def convert(self, model, block_swap_args=None) -> tuple:
        source = model.source
        if source is None:
            raise CoreBridgeError("this Wan model has no record of its file (it was not made by the Wan Model "
                                  "Loader). Connect the Wan Model Loader's output.")
        check_core_compatible(source)
        loras = lora_records(model)     # resolves every LoRA file before the long load
        device = compute_device()
        load = prepare_core_load(source, device)
        if load.notice is not None:
            notice(NODE, load.notice)
        bar = ProgressBar(load.linear_count)
        core, report = core_wan_model(load.sd, load.plan, resolve_dtype(source.precision, device), load.metadata,
                                      bar.update_absolute)
        del load                        # ComfyUI holds the weights now
        bar.update_absolute(bar.total)
        for lora in loras:
            core, added, found = core_lora(core, load_state_dict(lora.path), lora.strength,
                                           lambda key, blocks=lora.blocks: keep_patch(key, blocks))
            if added == 0:
                notice(NODE, f"LoRA {lora.name} changes no layer of ComfyUI's Wan model ({found} LoRA layers "
                             "found, none matched): check it was made for this model.")
            else:
                log.info("Wan to core MODEL: LoRA %s:%g on %d layers", lora.name, lora.strength, added)
        core = self._swap(core, block_swap_args or model.swap, model.config.num_layers)
        if source.compiled:
            notice(NODE, "Wan Compile Settings do not carry over to the core MODEL; use core TorchCompileModel.")
        log.info("Wan to core MODEL: %s as %s, %s", source.name, type(core.model).__name__, report.summary())
        return (core,)

    @staticmethod
    def _swap(core, swap, num_blocks: int):
        if swap is None or swap.blocks_to_swap <= 0:
            return core
        if swap.offload_txt_emb or swap.offload_img_emb:
            notice(NODE, "block swap on the core MODEL moves transformer blocks only; the text/image embedding "
                         "offload is not applied (they are small next to a block).")
        swapped = swap_indices(num_blocks, swap.blocks_to_swap)
        core, _ = core_block_swap(core, swapped, swap.prefetch_blocks, swap.use_non_blocking)
        log.info("Wan to core MODEL: %d of %d blocks swapped (%s), %d fetched ahead", len(swapped), num_blocks,
                 ",".join(map(str, swapped)), swap.prefetch_blocks)
        return core
