"""The INT8 loader's assembly, for any host: file -> canonical state dict -> family -> plan -> model.

"Load Diffusion Model INT8 (W8A8)" reads any quantized dialect (models/quant_formats.py), picks the
family's exclusion list (models/quant_presets.py) and plans every Linear (kernels/quant_layer.py)
here; the host then builds the model (inside ComfyUI its own loader with our operations class;
standalone, `build_own_architecture` below, one of our architectures from models/quant_build.py).
The node (nodes/quant.py) only resolves the file, passes the host's device, notice and progress,
and wraps what comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels import int8_onednn
from ..kernels.precision import UnsupportedDtypeError, fp8_dtype, fp8_matmul_missing
from ..kernels.quant_layer import ROTATE_ON_THE_FLY, QuantPlan, QuantReport
from .checkpoint import SAFETENSORS_EXTS, load_state_dict, read_metadata, read_safetensors_header
from .common.loading import INPUT_SCALE_SUFFIXES, WEIGHT_SCALE_SUFFIXES, read_safetensors
from .common.state_dict import linear_weight_count
from .quant_build import QuantizedDiffusionModel, build_quantized, standalone_architectures
from .quant_formats import FormatReport, normalize
from .quant_presets import BY_NAME, Resolution, resolve

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2", "fp16", "bf16", "fp32")
# The INT8-Fast pack's float weight_dtype values (its workflows store them): the precision the layers that
# stay floating point are kept and computed in.
FLOAT_WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Tensors that belong to a quantized layer's format (kept float32 by every producer).
_SCALE_SUFFIXES = WEIGHT_SCALE_SUFFIXES + INPUT_SCALE_SUFFIXES


@dataclass(frozen=True)
class StoragePlan:
    """What the weight_dtype widget means on this device."""

    dtype: torch.dtype | None    # fp8 storage of the layers that stay float, or None
    fast: bool                   # fp8 matmul for them
    note: str                    # for the log line
    notice: str | None = None    # to tell the user once (the `_fast` fallback)


def storage_plan(weight_dtype: str, device: torch.device) -> StoragePlan:
    """The fp8 storage, fp8 matmul choice and log note for the weight_dtype widget."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise UnsupportedDtypeError(f"Unknown weight_dtype '{weight_dtype}'. Valid choices: {', '.join(WEIGHT_DTYPES)}.")
    if weight_dtype == "default":
        return StoragePlan(None, False, "float layers keep the file's precision")
    if weight_dtype in FLOAT_WEIGHT_DTYPES:
        return StoragePlan(None, False, f"float layers in {weight_dtype}")
    dtype = fp8_dtype(weight_dtype)
    note = f"float layers stored in scaled {weight_dtype.removesuffix('_fast')}"
    if weight_dtype == "fp8_e5m2":
        note += " (e5m2 has half of e4m3's precision; prefer fp8_e4m3fn)"
    if not weight_dtype.endswith("_fast"):
        return StoragePlan(dtype, False, note)
    missing = fp8_matmul_missing(device)
    if missing is not None:
        return StoragePlan(dtype, False, note + f"; {missing}", f"{weight_dtype}: {missing}.")
    return StoragePlan(dtype, True, note + "; fp8 matmul on for them")


@dataclass
class Int8Load:
    """A file read and planned, ready for the host to build."""

    sd: dict[str, torch.Tensor]              # canonical layout (consumed by the build)
    metadata: dict[str, str]
    fmt: FormatReport
    resolution: Resolution
    plan: QuantPlan
    storage: StoragePlan
    source_float_dtypes: dict[str, torch.dtype]   # for a save to write the float tensors back as they came

    @property
    def linear_count(self) -> int:
        """How many 2-D weights the build goes through (the progress total)."""
        return linear_weight_count(self.sd)


def prepare_int8_load(path: str, weight_dtype: str, storage: StoragePlan, model_type: str, on_the_fly: bool,
                      convrot: bool, device: torch.device) -> Int8Load:
    """Read, normalize and plan one file for the INT8 loader (`storage`: `storage_plan` of weight_dtype)."""
    metadata = read_metadata(path)
    sd, fmt = normalize(read_int8_file(path, device), metadata)
    if weight_dtype in FLOAT_WEIGHT_DTYPES:
        _convert_float_tensors(sd, FLOAT_WEIGHT_DTYPES[weight_dtype])
    resolution = resolve(model_type, sd.keys())
    plan = QuantPlan(on_the_fly=bool(on_the_fly), rotation=ROTATE_ON_THE_FLY and bool(convrot),
                     exclude=resolution.rules, float_storage=storage.dtype, fp8_fast=storage.fast,
                     work_device=device if device.type == "cuda" else None)
    return Int8Load(sd, metadata, fmt, resolution, plan, storage, _float_dtypes(sd, resolution.prefix))


def read_int8_file(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors for the INT8 loader.

    Where the int8 layers live on this CPU as oneDNN-packed weights, the file is read with plain
    reads, every int8 tensor into one reused buffer, and the 2-D ones (the weights) are packed at
    once: the state dict holds packed weights from the start and the plain int8 weights never
    exist side by side. That matters inside ComfyUI: its loader keeps the whole state dict
    referenced until every layer is loaded, so weights packed only when a layer takes them would
    sit beside their plain copies, twice the int8 bytes. (A memory map would keep the file's pages
    resident beside the packed copies as long as the float tensors view it.) Anywhere else the
    layers keep the plain tensors, and a map lets them share the file's pages.
    """
    packs = device.type == "cpu" and int8_onednn.backend() == int8_onednn.BACKEND_PREPACKED
    if not packs or not path.lower().endswith(SAFETENSORS_EXTS):
        return load_state_dict(path)
    header, _ = read_safetensors_header(path)
    sd: dict[str, torch.Tensor] = {}
    for key, tensor in read_safetensors(path, list(header), transient=lambda _key, dtype: dtype == torch.int8):
        if tensor.dtype == torch.int8:     # a view of the reused buffer: packed (2-D weights) or copied out
            packed = int8_onednn.pack(tensor, key)
            tensor = packed if packed is not None else tensor.clone()
        sd[key] = tensor
    return sd


def build_own_architecture(sd: dict[str, torch.Tensor], load: Int8Load, device: torch.device,
                           on_layer: Callable[[int, int], None] | None = None,
                           ) -> tuple[QuantizedDiffusionModel, QuantReport]:
    """(diffusion model, report) from one of our own architectures: what a host without an
    architecture zoo (a plain process) builds the int8 model from."""
    family = load.resolution.name
    arch = standalone_architectures().get(family)
    if arch is None:
        title = BY_NAME[family].title if family in BY_NAME else "unrecognised"
        supported = ", ".join(a.title for a in standalone_architectures().values())
        raise ValueError(f"This is a {title} model. Outside ComfyUI this loader builds only our own "
                         f"architectures ({supported}); inside ComfyUI every architecture ComfyUI supports loads.")
    prefix = load.resolution.prefix
    for key in list(sd):            # in place: build_quantized frees each tensor as it consumes it
        value = sd.pop(key)
        if key.startswith(prefix):
            sd[key[len(prefix):]] = value
    module, report = build_quantized(sd, arch, load.plan, load.metadata, device, on_layer=on_layer)
    return QuantizedDiffusionModel(module, family, report), report


def _float_dtypes(sd: dict, prefix: str) -> dict[str, torch.dtype]:
    """{key under the diffusion model: dtype} of the file's float tensors, so a save writes them back
    as they came (a host may widen some: ComfyUI keeps Wan's patch embedding in fp32)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v.dtype for k, v in sd.items()
            if v.is_floating_point() and v.element_size() > 1}


def _convert_float_tensors(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Plain float tensors to `dtype`, in place, one at a time; int8, fp8 and scale tensors stay as they are
    (their precision is the quantized format's)."""
    for key, value in sd.items():
        if value.dtype in (torch.float16, torch.bfloat16, torch.float32) and not key.endswith(_SCALE_SUFFIXES):
            sd[key] = value.to(dtype)
