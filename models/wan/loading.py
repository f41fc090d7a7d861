"""Loading a module's weights without a second copy in RAM, and the storage-dtype plan.

The recipe: build the module on the `meta` device (no memory), read the checkpoint one tensor at
a time straight into its final dtype and device, then `load_state_dict(assign=True)` so the
module adopts those tensors. Safetensors files are read with plain `readinto` at the header's
offsets instead of a memory map: mapped file pages count towards the process's resident memory,
so converting an fp32 file to bf16 through a map would peak at the file plus the result.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...kernels.precision import is_fp8
from ..checkpoint import CheckpointError, read_safetensors_header
from .layers import FP8_MAX

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_DTYPES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})

# Per-layer scales of "scaled fp8" files: ComfyUI/kijai name them `<layer>.scale_weight` (older)
# or `<layer>.weight_scale`; input scales only matter to fp8 matmuls, which we do not run.
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")


def safetensors_dtype(path: str, name: str, code: str) -> torch.dtype:
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}' has dtype {code}, which this torch cannot load.")
    return SAFETENSORS_DTYPES[code]


def read_safetensors(path: str, keys: Iterable[str],
                     transient: Callable[[str, torch.dtype], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, CPU tensor) for `keys` in order, read with `readinto` (no memory map).

    Tensors for which `transient(key, dtype)` is true are views into one scratch buffer that the
    next item overwrites: for callers that convert each tensor at once. Reusing one buffer keeps
    the allocator from fragmenting the heap with freed temporaries (glibc raises its mmap
    threshold after the first large free, and the holes then count as resident memory).
    """
    header, _ = read_safetensors_header(path)
    scratch = torch.empty(0, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        base = 8 + header_len
        for key in keys:
            if key not in header:
                raise CheckpointError(f"{path}: missing tensor '{key}'.")
            info = header[key]
            start, end = (int(o) for o in info["data_offsets"])
            dtype = safetensors_dtype(path, key, info["dtype"])
            shape = [int(s) for s in info["shape"]]
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes != end - start:
                raise CheckpointError(f"{path}: tensor '{key}' holds {end - start} bytes but its shape {shape} and "
                                      f"dtype {info['dtype']} need {nbytes}. The file is damaged.")
            if transient is not None and transient(key, dtype):
                if scratch.numel() < nbytes:
                    scratch = torch.empty(nbytes, dtype=torch.uint8)
                raw = scratch[:nbytes]
                tensor = raw.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)
            else:
                tensor = torch.empty(shape, dtype=dtype)
                raw = tensor.reshape(-1).view(torch.uint8)
            f.seek(base + start)
            if nbytes and f.readinto(memoryview(raw.numpy())) != nbytes:
                raise CheckpointError(f"{path}: tensor '{key}' is cut short. The file is truncated; fetch it again.")
            yield key, tensor


def split_weight_scales(entries: Mapping[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """(weights, {layer path: weight scale}) with input scales dropped."""
    weights: dict[str, object] = {}
    scales: dict[str, object] = {}
    for key, value in entries.items():
        if key.endswith(INPUT_SCALE_SUFFIXES):
            continue
        for suffix in WEIGHT_SCALE_SUFFIXES:
            if key.endswith(suffix):
                scales[key[: -len(suffix)]] = value
                break
        else:
            weights[key] = value
    return weights, scales


@dataclass(frozen=True)
class DtypePlan:
    """Which dtype each loaded tensor gets: `weight_dtype` for the big matmul weights, `dtype` for the rest."""

    dtype: torch.dtype                 # compute dtype and storage of every other float tensor
    weight_dtype: torch.dtype          # storage of the quantizable Linear weights (may be fp8)
    quantizable: frozenset[str]        # state-dict keys that get weight_dtype

    def target(self, key: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored
        return self.weight_dtype if key in self.quantizable else self.dtype


def plan_dtypes(dtype: torch.dtype | None, weight_dtype: torch.dtype | None, reference: torch.dtype,
                quantizable: Iterable[str]) -> DtypePlan:
    """Fill in what the caller left open from the file's `reference` (main weight) dtype.

    No dtype: compute in the file's dtype, or bf16 if the file stores fp8. No weight dtype: keep
    fp8 weights as fp8 (auto-detected fp8 files stay small), else store them in the compute dtype.
    """
    if dtype is not None and (is_fp8(dtype) or not dtype.is_floating_point):
        raise CheckpointError(f"compute dtype must be fp32, fp16 or bf16, got {dtype}; fp8 is a weight "
                              "storage dtype (pass it as weight_dtype).")
    compute = dtype or (torch.bfloat16 if is_fp8(reference) or not reference.is_floating_point else reference)
    storage = weight_dtype or (reference if is_fp8(reference) else compute)
    return DtypePlan(compute, storage, frozenset(quantizable))


def convert(tensor: torch.Tensor, target: torch.dtype, device: torch.device | str | None,
            scale: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor to its target dtype/device, dequantizing with a scale or clamping into fp8 range."""
    device = tensor.device if device is None else torch.device(device)
    if scale is not None:
        tensor = tensor.to(device=device, dtype=torch.float32) * scale.to(device=device, dtype=torch.float32)
    if is_fp8(target) and not is_fp8(tensor.dtype):
        # fp8 e4m3fn has no infinity: out-of-range values would become NaN instead of saturating.
        limit = FP8_MAX[target]
        tensor = tensor.to(device=device).float().clamp(-limit, limit)
    return tensor.to(device=device, dtype=target)


def assign_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], plan: DtypePlan,
                   device: torch.device | str | None, scales: Mapping[str, torch.Tensor] | None = None,
                   scale_holder: Callable[[nn.Module], bool] | None = None) -> nn.Module:
    """Convert tensors one by one and make the meta-built `model` adopt them (strict).

    A weight kept in fp8 keeps its file scale as the layer's `weight_scale` buffer (layers for
    which `scale_holder` is true); any other scaled weight is dequantized here.
    """
    scales = dict(scales or {})
    state: dict[str, torch.Tensor] = {}
    kept_scales: dict[str, torch.Tensor] = {}
    for key, tensor in tensors:
        target = plan.target(key, tensor.dtype)
        layer = key.rsplit(".", 1)[0]
        scale = scales.get(layer) if key.endswith(".weight") else None
        if scale is not None and is_fp8(target) and is_fp8(tensor.dtype):
            kept_scales[layer] = scale.to(device=device or tensor.device, dtype=torch.float32)
            scale = None
        state[key] = convert(tensor, target, device, scale)
        del tensor
    model.load_state_dict(state, strict=True, assign=True)
    for layer, scale in kept_scales.items():
        module = model.get_submodule(layer)
        if scale_holder is None or not scale_holder(module):
            raise CheckpointError(f"'{layer}' has a weight scale but is not a layer that can keep one.")
        module.weight_scale = scale
    model.requires_grad_(False)
    return model.eval()
