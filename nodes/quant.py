"""INT8 family: "Load Diffusion Model INT8 (W8A8)" and "Save INT8 Model".

The loader reads any quantized dialect (models/quant_formats.py), picks the family's exclusion
list (models/quant_presets.py), then lets the host build the model: inside ComfyUI, ComfyUI's
own loader with our operations class (every architecture ComfyUI knows); standalone, one of our
architectures (models/quant_build.py). The saver writes ComfyUI's official int8 layout, which
ComfyUI's own "Load Diffusion Model" reads.
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
from ..kernels.precision import UnsupportedDtypeError, fp8_dtype, fp8_matmul_missing
from ..kernels.quant_layer import ROTATE_ON_THE_FLY, QuantPlan
from ..models.checkpoint import load_state_dict, read_metadata
from ..models.quant_build import QuantizedDiffusionModel, build_quantized, standalone_architectures
from ..models.quant_formats import file_metadata, normalize
from ..models.quant_presets import BY_NAME, MODEL_TYPES, detect, resolve

log = logging.getLogger("slipstream.int8")

CATEGORY = "Slipstream/INT8"
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2", "fp16", "bf16", "fp32")
# The INT8-Fast pack's float weight_dtype values (its workflows store them): the precision the layers that
# stay floating point are kept and computed in.
FLOAT_WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NO_MODELS = "(no files in models/diffusion_models)"


def storage_plan(weight_dtype: str, device: torch.device) -> tuple[torch.dtype | None, bool, str]:
    """(fp8 storage dtype or None, fp8 matmul on?, a note for the log) for the weight_dtype widget."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise UnsupportedDtypeError(f"Unknown weight_dtype '{weight_dtype}'. Valid choices: {', '.join(WEIGHT_DTYPES)}.")
    if weight_dtype == "default":
        return None, False, "float layers keep the file's precision"
    if weight_dtype in FLOAT_WEIGHT_DTYPES:
        return None, False, f"float layers in {weight_dtype}"
    dtype = fp8_dtype(weight_dtype)
    note = f"float layers stored in scaled {weight_dtype.removesuffix('_fast')}"
    if weight_dtype == "fp8_e5m2":
        note += " (e5m2 has half of e4m3's precision; prefer fp8_e4m3fn)"
    fast = weight_dtype.endswith("_fast")
    if fast:
        missing = fp8_matmul_missing(device)
        if missing is not None:
            notice("Load Diffusion Model INT8 (W8A8)", f"{weight_dtype}: {missing}.")
            note += f"; {missing}"
            fast = False
        else:
            note += "; fp8 matmul on for them"
    return dtype, fast, note


def _float_dtypes(sd: dict, prefix: str) -> dict[str, torch.dtype]:
    """{key under the diffusion model: dtype} of the file's float tensors, so a save writes them back
    as they came (a host may widen some: ComfyUI keeps Wan's patch embedding in fp32)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v.dtype for k, v in sd.items()
            if v.is_floating_point() and v.element_size() > 1}


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
        storage, fast, storage_note = storage_plan(weight_dtype, device)
        metadata = read_metadata(path)
        sd, fmt = normalize(load_state_dict(path), metadata)
        if weight_dtype in FLOAT_WEIGHT_DTYPES:
            _convert_float_tensors(sd, FLOAT_WEIGHT_DTYPES[weight_dtype])
        resolution = resolve(model_type, sd.keys())
        if not fmt.prequantized and not on_the_fly_quantization:
            log.warning("%s has no int8 layers and on_the_fly_quantization is off: it loads as a float model. "
                        "Turn on on_the_fly_quantization to get int8.", unet_name)
        plan = QuantPlan(on_the_fly=bool(on_the_fly_quantization), rotation=ROTATE_ON_THE_FLY and bool(enable_convrot),
                         exclude=resolution.rules, float_storage=storage, fp8_fast=fast,
                         work_device=device if device.type == "cuda" else None)
        pbar = ProgressBar(max(1, sum(1 for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2)))
        source_dtypes = _float_dtypes(sd, resolution.prefix)
        model, report = self._build(sd, plan, metadata, resolution, device, pbar)
        model.model.source_float_dtypes = source_dtypes
        pbar.update_absolute(pbar.total)
        kernel = kernel_note(device, sum(1 for _, note in report.entries.values() if ", ConvRot " in note))
        log.info("Loaded %s: %s. %s. %s; %s%s.", unet_name, resolution.message, fmt.summary(), report.summary(),
                 storage_note, f". {kernel}" if kernel else "")
        return (model,)

    @staticmethod
    def _build(sd, plan, metadata, resolution, device, pbar):
        def own_build(sd):
            return _build_own_architecture(sd, plan, metadata, resolution, device, pbar)

        return load_int8_diffusion_model(sd, plan, metadata, pbar.update_absolute, own_build=own_build)


def _build_own_architecture(sd, plan, metadata, resolution, device, pbar):
    """(MODEL, report) from one of our own architectures: what a host without an architecture zoo
    (a plain process) builds the int8 model from."""
    family = resolution.name
    arch = standalone_architectures().get(family)
    if arch is None:
        title = BY_NAME[family].title if family in BY_NAME else "unrecognised"
        supported = ", ".join(a.title for a in standalone_architectures().values())
        raise ValueError(f"This is a {title} model. Outside ComfyUI this loader builds only our own "
                         f"architectures ({supported}); inside ComfyUI every architecture ComfyUI supports loads.")
    prefix = resolution.prefix
    for key in list(sd):            # in place: build_quantized frees each tensor as it consumes it
        value = sd.pop(key)
        if key.startswith(prefix):
            sd[key[len(prefix):]] = value
    module, report = build_quantized(sd, arch, plan, metadata, device, on_layer=pbar.update_absolute)
    wrapper = QuantizedDiffusionModel(module, family, report)
    return model_value(wrapper, device, offload_device()), report


def _convert_float_tensors(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Plain float tensors to `dtype`, in place, one at a time; int8, fp8 and scale tensors stay as they are
    (their precision is the quantized format's)."""
    for key, value in sd.items():
        if value.dtype in (torch.float16, torch.bfloat16, torch.float32) and not key.endswith(_SCALE_SUFFIXES):
            sd[key] = value.to(dtype)


# Tensors that belong to a quantized layer's format (kept float32 by every producer).
_SCALE_SUFFIXES = (".weight_scale", ".scale_weight", ".input_scale", ".scale_input")


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
