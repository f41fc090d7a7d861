"""What a loaded Wan model was made from, so ComfyUI can build the same model in its own architecture.

The Wan Model Loader records here the file, the compute precision, the storage plan and the LoRAs it
merged (and the Wan Apply LoRA chain adds its own). "Wan Model to core MODEL" reads this record and
has ComfyUI load the same file through its Wan code with our int8/fp8 layers: core's KSampler,
ModelSamplingSD3, LoRA loaders and Wan conditioning nodes then work on it unchanged, because the
MODEL is ComfyUI's own WAN21/WAN22 with only the Linear layers ours.

Nothing here imports ComfyUI: the rules (which layers become fp8 or int8, which LoRA patches a block
selection keeps, what ComfyUI's Wan model cannot carry) are plain data, tested without a host.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ...kernels.precision import fp8_dtype, fp8_matmul_missing, is_fp8
from ...kernels.quant_layer import ROTATE_ON_THE_FLY, QuantPlan
from ..checkpoint import load_state_dict, read_metadata
from ..common.state_dict import linear_weight_count
from ..gguf_file import is_gguf
from ..quant_formats import normalize
from ..quant_presets import BY_NAME
from .lora import block_of

# The Linear layers outside the transformer blocks stay in the compute precision: the INT8 loader's
# Wan preset (embeddings, head, CLIP projection, a speech model's projector), which the Wan Model
# Loader's int8 uses too (`int8_plan`).
WAN_FLOAT_LAYERS = BY_NAME["wan"].rules()



class CoreBridgeError(ValueError):
    """This Wan model cannot become a core MODEL; the message says what to do instead."""


@dataclass(frozen=True)
class LoraRecord:
    """One LoRA the Wan model carries: merged at load or applied at run time (both become core patches)."""

    name: str
    path: str
    strength: float
    blocks: tuple[int, ...] = ()      # transformer blocks it touches; () = all


@dataclass(frozen=True)
class WanSource:
    """The Wan Model Loader's inputs that decide the weights: enough to rebuild the model elsewhere."""

    path: str
    precision: str = "bf16"            # base_precision: compute dtype, storage of the float layers
    quantization: str = "disabled"     # the loader's choice (disabled / fp8_* / int8_w8a8)
    loras: tuple[LoraRecord, ...] = ()
    speech_model: str | None = None    # a MultiTalk / FantasyTalking adapter attached at load
    compiled: bool = False

    @property
    def name(self) -> str:
        return self.path.replace("\\", "/").rsplit("/", 1)[-1]

    def with_loras(self, loras: tuple[LoraRecord, ...]) -> WanSource:
        return replace(self, loras=self.loras + tuple(loras))


def check_core_compatible(source: WanSource) -> None:
    """Refuse, before anything loads, what ComfyUI's Wan architecture cannot hold."""
    if is_gguf(source.path):
        raise CoreBridgeError(
            f"{source.name} is a GGUF file: this ComfyUI has no GGUF diffusion-model loader, so the core MODEL "
            "cannot be built from it. Use a safetensors Wan file (fp16/bf16/fp8; quantization int8_w8a8 gives "
            "int8 layers), or keep the GGUF model on the Wan Sampler.")
    if source.speech_model is not None:
        raise CoreBridgeError(
            f"this Wan model carries the speech adapter '{source.speech_model}': ComfyUI's Wan architecture has "
            "no place for MultiTalk / InfiniteTalk / FantasyTalking weights, so core samplers would drop the "
            "audio. Sample it with the Wan Sampler (audio_embeds input), or remove the speech model from the "
            "Wan Model Loader to use core nodes.")


@dataclass
class CoreLoad:
    """The recorded file read and planned, ready for ComfyUI to build its Wan model from."""

    sd: dict[str, torch.Tensor]              # canonical layout (consumed by the build)
    metadata: dict[str, str]
    plan: QuantPlan
    notice: str | None = None                # to tell the user once (the `_fast` fallback)

    @property
    def linear_count(self) -> int:
        """How many 2-D weights the build goes through (the progress total)."""
        return linear_weight_count(self.sd)


def prepare_core_load(source: WanSource, device: torch.device) -> CoreLoad:
    """Read, normalize and plan the recorded file: the storage the Wan Model Loader gave it, fp8 matmul
    off (said once) where this device has none, as in both loaders."""
    metadata = read_metadata(source.path)
    sd, _ = normalize(load_state_dict(source.path), metadata)
    plan = quant_plan(source, _block_weight_dtype(sd), device if device.type == "cuda" else None)
    missing = fp8_matmul_missing(device) if plan.fp8_fast else None
    if missing is None:
        return CoreLoad(sd, metadata, plan)
    return CoreLoad(sd, metadata, replace(plan, fp8_fast=False), f"{source.quantization}: {missing}.")


def _block_weight_dtype(sd: dict):
    """The storage of the first block's query weight: decides whether a 'disabled' load keeps fp8."""
    key = next((k for k in sd if k.endswith("blocks.0.self_attn.q.weight")), None)
    if key is None:
        raise CoreBridgeError("the file has no 'blocks.0.self_attn.q.weight': it is not a Wan diffusion model "
                              "ComfyUI can read. Use an official, ComfyUI or kijai Wan 2.1 / 2.2 file.")
    return sd[key].dtype


def int8_plan(work_device: torch.device | None) -> QuantPlan:
    """W8A8 for the block Linears, quantized on the fly (ConvRot where it is on), the rest float: the
    Wan Model Loader's int8 and the core MODEL built from the same record."""
    return QuantPlan(on_the_fly=True, rotation=ROTATE_ON_THE_FLY, exclude=WAN_FLOAT_LAYERS, work_device=work_device)


def quant_plan(source: WanSource, file_weight_dtype: torch.dtype, work_device: torch.device | None) -> QuantPlan:
    """The same storage the Wan Model Loader gives the block Linears, as a plan for our ComfyUI layers.

    int8_w8a8: block Linears quantized on the fly (ConvRot as in the loader), the rest float. fp8_*:
    block Linears in scaled fp8. disabled: an fp8 file's block Linears stay fp8 as stored (the loader
    keeps them too), anything else keeps the compute precision.
    """
    q = source.quantization
    if q == "int8_w8a8":
        return int8_plan(work_device)
    if q.startswith("fp8_"):
        return QuantPlan(float_storage=fp8_dtype(q), fp8_fast=q.endswith("_fast"), fp8_exclude=WAN_FLOAT_LAYERS)
    if q != "disabled":
        raise CoreBridgeError(f"unknown quantization '{q}' recorded for {source.name}.")
    if is_fp8(file_weight_dtype):
        return QuantPlan(float_storage=file_weight_dtype, fp8_exclude=WAN_FLOAT_LAYERS)
    return QuantPlan()


def keep_patch(key: str, blocks: tuple[int, ...]) -> bool:
    """Whether a LoRA patch on model key `key` survives a block selection: () keeps every patch, and
    layers outside the transformer blocks (embeddings, head) are always patched, as in the loader's merge."""
    index = block_of(key)
    return not blocks or index is None or index in blocks
