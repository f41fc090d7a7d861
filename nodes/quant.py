"""INT8 family: "Load Diffusion Model INT8 (W8A8)" and "Save INT8 Model".

The loader's reading and planning is models/quant_loading.py (any quantized dialect, the family's
exclusion list, a plan per Linear); this node passes the host's device, notice and progress, then
lets the host build the model: inside ComfyUI, ComfyUI's own loader with our operations class
(every architecture ComfyUI knows); standalone, one of our architectures (models/quant_build.py).
The saver writes ComfyUI's official int8 layout, which ComfyUI's own "Load Diffusion Model" reads.
"""

from __future__ import annotations

import logging
import os

import torch

from ..host import (
    ProgressBar,
    compute_device,
    diffusion_state_dict,
    list_models,
    load_int8_diffusion_model,
    model_path,
    model_value,
    notice,
    offload_device,
    prefix_problem,
    publish,
    save_target,
    staged_file,
    ui_file,
)
from ..kernels.int8 import kernel_note
from ..models.quant_formats import file_metadata
from ..models.quant_loading import WEIGHT_DTYPES, build_own_architecture, prepare_int8_load, storage_plan
from ..models.quant_presets import MODEL_TYPES, detect

log = logging.getLogger("slipstream.int8")

CATEGORY = "Slipstream/INT8"
NO_MODELS = "(no files in models/diffusion_models)"


class LoadDiffusionModelInt8:
    """OTUNetLoaderW8A8 — the node id and inputs users know from the original INT8 pack."""

    DESCRIPTION = ("Loads a diffusion model with int8 weights and int8 activations (W8A8): half the memory of "
                   "bf16 and an int8 matrix multiply. Reads ComfyUI's official int8 files, the older INT8 packs' "
                   "files and scaled fp8 files (fp8 weights are dequantized with their scale first); with "
                   "on_the_fly_quantization it quantizes a float checkpoint while loading, keeping sensitive "
                   "layers (embedders, modulation, final layers) in floating point. Fastest on NVIDIA 20/30/40 "
                   "series and on CPUs with AMX or VNNI (weights prepacked once for oneDNN); little gain on "
                   "A100/H100, where fp8 is as fast.")
    CATEGORY = CATEGORY
    FUNCTION = "load_unet"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The diffusion model with int8 Linear layers; works with KSampler, LoRA loaders and "
                       "ComfyUI's memory management.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "unet_name": (list_models("diffusion_models") or [NO_MODELS], {
                    "tooltip": "A diffusion model from models/diffusion_models: an int8 file (ComfyUI's format or "
                               "an older INT8 pack's), or a bf16/fp16/fp32/fp8 file to quantize on the fly."}),
                "weight_dtype": (list(WEIGHT_DTYPES), {
                    "default": "default",
                    "tooltip": "Storage of the layers that stay floating point (never the int8 ones). default: as "
                               "in the file. fp8_e4m3fn / fp8_e5m2: scaled fp8, saving memory. fp8_e4m3fn_fast: "
                               "also multiplies those layers in fp8 on GPUs that can (RTX 40xx, H100). fp16 / "
                               "bf16 / fp32: those layers converted to that precision (as INT8-Fast workflows "
                               "set it)."}),
                "model_type": (list(MODEL_TYPES), {
                    "default": "auto",
                    "tooltip": "Which family's layers to keep float when quantizing on the fly. auto detects it "
                               "from the file and says what it found; a choice that contradicts the file is "
                               "reported as an error instead of producing noise."}),
                "on_the_fly_quantization": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Quantize float layers to int8 while loading (with ConvRot rotation for accuracy). "
                               "Layers already int8 in the file always load as int8. Save the result with "
                               "'Save INT8 Model' to skip this step next time."}),
            },
            "optional": {
                "enable_convrot": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "ConvRot (Hadamard rotation) for layers quantized on the fly: about GGUF Q8 quality "
                               "at ~1.1x the time. Off: plain W8A8, faster, larger error on real activations. "
                               "Pre-quantized layers keep the rotation their file records."}),
            },
        }

    def load_unet(self, unet_name: str, weight_dtype: str, model_type: str, on_the_fly_quantization: bool,
                  enable_convrot: bool = True) -> tuple:
        path = model_path("diffusion_models", unet_name)
        device = compute_device()
        storage = storage_plan(weight_dtype, device)
        if storage.notice is not None:
            notice("Load Diffusion Model INT8 (W8A8)", storage.notice)
        load = prepare_int8_load(path, weight_dtype, storage, model_type, on_the_fly_quantization, enable_convrot,
                                 device)
        if not load.fmt.prequantized and not on_the_fly_quantization:
            log.warning("%s has no int8 layers and on_the_fly_quantization is off: it loads as a float model. "
                        "Turn on on_the_fly_quantization to get int8.", unet_name)
        pbar = ProgressBar(load.linear_count)

        def own_build(sd):
            module, report = build_own_architecture(sd, load, device, on_layer=pbar.update_absolute)
            return model_value(module, device, offload_device()), report

        model, report = load_int8_diffusion_model(load.sd, load.plan, load.metadata, pbar.update_absolute,
                                                  own_build=own_build)
        model.model.source_float_dtypes = load.source_float_dtypes
        pbar.update_absolute(pbar.total)
        kernel = kernel_note(device, sum(1 for _, note in report.entries.values() if ", ConvRot " in note))
        log.info("Loaded %s: %s. %s. %s; %s%s.", unet_name, load.resolution.message, load.fmt.summary(),
                 report.summary(), storage.note, f". {kernel}" if kernel else "")
        return (model,)


class SaveInt8Model:
    """SlipstreamSaveInt8Model: write a loaded int8 model in ComfyUI's official format."""

    DESCRIPTION = ("Saves the diffusion model of a MODEL loaded by 'Load Diffusion Model INT8 (W8A8)' as a "
                   "safetensors file in ComfyUI's official int8 format (int8 weights, per-row float32 scales, "
                   "comfy_quant tags, ConvRot flags), so it loads again without on-the-fly quantization — in this "
                   "node pack, in ComfyUI's own 'Load Diffusion Model' (versions with int8 support) and in other "
                   "int8 tools. LoRAs applied to the MODEL are baked in. Never overwrites a file.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ()
    RETURN_NAMES = ()
    OUTPUT_TOOLTIPS = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A MODEL from 'Load Diffusion Model INT8 (W8A8)' (at least one int8 "
                                               "layer)."}),
                "filename_prefix": ("STRING", {
                    "default": "diffusion_models/int8",
                    "tooltip": "Path under the output folder; a counter and .safetensors are added. ComfyUI also "
                               "lists output/diffusion_models in its model lists, so the default prefix makes the "
                               "file loadable right away (refresh the list)."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):  # noqa: N802 (ComfyUI's name)
        """A prefix no file can be saved under fails when the prompt is queued, not after quantizing."""
        return prefix_problem(filename_prefix)

    def save(self, model, filename_prefix: str) -> dict:
        from safetensors.torch import save_file

        sd = diffusion_state_dict(model)
        int8_layers = sum(1 for k, v in sd.items() if k.endswith(".weight") and v.dtype == torch.int8)
        if int8_layers == 0:
            raise ValueError("This MODEL has no int8 layers: load it with 'Load Diffusion Model INT8 (W8A8)' with "
                             "on_the_fly_quantization on (or from an int8 file) before saving it as int8.")
        family_name = getattr(model.model, "model_family", None)
        if not family_name:             # a MODEL ComfyUI built: recognise the family from its keys
            found = detect(sd.keys()).family
            family_name = found.name if found is not None else "unknown"
        source = getattr(model.model, "source_float_dtypes", None) or {}
        sd = {k: v.detach().to(device="cpu", dtype=source.get(k, v.dtype) if v.is_floating_point() else v.dtype)
              .contiguous() for k, v in sd.items()}
        target = save_target(filename_prefix)
        with staged_file(target, "safetensors") as tmp:
            save_file(sd, tmp, metadata=file_metadata(family_name, f"{int8_layers} int8 layers"))
            final = publish(tmp, target, "safetensors")
        size = os.path.getsize(final)
        log.info("Saved %s (%d int8 layers, %.1f MiB).", final, int8_layers, size / 2**20)
        return {"ui": {"text": [f"{os.path.basename(final)}: {int8_layers} int8 layers, {size / 2**20:.1f} MiB"],
                       "files": [ui_file(final, target)]}}
