"""Loading a module's weights without a second copy in RAM, and the storage-dtype plan.

Every family's own loaders use it (Wan's DiT, encoders and speech models, Anima's DiT and Qwen3
through models/common/state_dict.load_file_built_on_meta), so a checkpoint costs about its
loaded size in RAM whatever the model.

The recipe: build the module on the `meta` device (no memory); allocate every output tensor up
front in its final dtype and device; read the checkpoint one tensor at a time straight into its
output (or into one reused scratch buffer when it must be converted, then convert in small
chunks); finally `load_state_dict(assign=True)` so the module adopts the outputs.

Why this order: safetensors are read with plain `readinto` instead of a memory map, because mapped
file pages count towards resident memory (an fp32 file converted to bf16 through a map peaks at
the file plus the result). And outputs are allocated before any temporary exists, because glibc
raises its mmap threshold after the first large free, after which freed temporaries become
holes between kept tensors that still count as resident memory — measured at up to 2x the weights.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...kernels.cast_linear import CastLinear
from ...kernels.fp8 import as_weight_scale, dequantize_into, quantize_scaled_fp8
from ...kernels.precision import is_fp8
from ..checkpoint import CheckpointError, read_safetensors_header
from ..finite import check_tensor

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


def read_safetensors(path: str, keys: Iterable[str], transient: Callable[[str, torch.dtype], bool] | None = None,
                     out: Mapping[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, CPU tensor) for `keys` in order, read with `readinto` (no memory map).

    A key found in `out` (a contiguous CPU tensor of the stored dtype and shape) is read straight
    into that tensor. A key for which `transient(key, dtype)` is true is read into one scratch
    buffer reused for every item: the yielded view is valid until the next item, so the caller
    converts or copies it at once. Any other key gets a fresh tensor.
    """
    header, _ = read_safetensors_header(path)
    out = out or {}
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
            if key in out:
                tensor = out[key]
                if tensor.dtype != dtype or list(tensor.shape) != shape or tensor.device.type != "cpu":
                    raise ValueError(f"read_safetensors: destination for '{key}' must be a CPU {dtype} {shape}")
                raw = tensor.reshape(-1).view(torch.uint8)
            elif transient is None or not transient(key, dtype):
                tensor = torch.empty(shape, dtype=dtype)
                raw = tensor.reshape(-1).view(torch.uint8)
            else:
                if scratch.numel() < nbytes:
                    scratch = torch.empty(nbytes, dtype=torch.uint8)
                raw = scratch[:nbytes]
                tensor = raw.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)
            f.seek(base + start)
            if nbytes and f.readinto(memoryview(raw.numpy())) != nbytes:
                raise CheckpointError(f"{path}: tensor '{key}' is cut short. The file is truncated; fetch it again.")
            yield key, check_tensor(key, tensor, path)


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

    dtype: torch.dtype | None          # compute dtype and storage of every other float tensor (None: as stored)
    weight_dtype: torch.dtype | None   # storage of the quantizable Linear weights (may be fp8)
    quantizable: frozenset[str]        # state-dict keys that get weight_dtype

    def target(self, key: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored
        return (self.weight_dtype if key in self.quantizable else self.dtype) or stored


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


def allocate_outputs(shapes: Mapping[str, tuple[int, ...]], stored: Mapping[str, torch.dtype], plan: DtypePlan,
                     device: torch.device | str | None, scaled: Iterable[str] = (),
                     adopt_unchanged: bool = False) -> dict[str, torch.Tensor | None]:
    """An empty output tensor per key in its final dtype on `device` (default CPU), allocated before
    any reading starts. With `adopt_unchanged`, keys whose tensor can be used as it is (same
    dtype, no scale to fold in) get None: the caller's tensor is adopted instead."""
    scaled = set(scaled)
    device = torch.device(device) if device is not None else torch.device("cpu")
    outputs: dict[str, torch.Tensor | None] = {}
    for key, shape in shapes.items():
        target = plan.target(key, stored[key])
        keeps_scale = key in scaled and is_fp8(target) and stored[key] == target
        unchanged = target == stored[key] and (key not in scaled or keeps_scale)
        outputs[key] = None if adopt_unchanged and unchanged else torch.empty(shape, dtype=target, device=device)
    return outputs


def fill_output(out: torch.Tensor | None, tensor: torch.Tensor, device: torch.device | str | None,
                file_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(final tensor, weight scale to keep or None) for one source tensor and its planned output.

    An fp8 output keeps an fp8 source of the same dtype with its file scale; a float source is
    quantized with a fresh per-tensor scale (a plain cast loses the small weights of wide layers
    to fp8's subnormal range). A float output of a scaled source is dequantized.
    """
    if out is None:                                    # adopted as it is (moved if needed)
        return tensor.to(device=device or tensor.device), file_scale
    if out is not tensor:
        if is_fp8(out.dtype) and tensor.dtype != out.dtype:
            return quantize_scaled_fp8(tensor, out.dtype, out=out, source_scale=file_scale)
        if file_scale is not None and not is_fp8(out.dtype):
            dequantize_into(out, tensor, file_scale)
            return out, None
        out.copy_(tensor)
    return out, (file_scale if is_fp8(out.dtype) else None)


def assign_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], plan: DtypePlan,
                   device: torch.device | str | None, scales: Mapping[str, torch.Tensor] | None = None,
                   scale_holder: Callable[[nn.Module], bool] | None = None, *,
                   outputs: Mapping[str, torch.Tensor | None] | None = None) -> nn.Module:
    """Fill each key's output from its source tensor and make the meta-built `model` adopt them
    (strict). Weight scales kept with fp8 weights become the layer's `weight_scale` (layers for
    which `scale_holder` is true; default: `CastLinear`).

    `outputs` (from `allocate_outputs`) are the pre-allocated outputs; without them each output
    is allocated as its tensor arrives, which is simpler but lets freed temporaries fragment the
    heap between kept tensors (see the module docstring).
    """
    scales = dict(scales or {})
    holder = scale_holder or (lambda m: isinstance(m, CastLinear))
    # Everything kept past the loop is created before it (dict tables, one scalar per fp8 layer
    # for its fresh scale): a small allocation kept between two temporaries pins a heap hole.
    keys = list(outputs) if outputs is not None else None
    state: dict[str, torch.Tensor | None] = dict.fromkeys(keys or ())
    slot_device = torch.device(device) if device is not None else torch.device("cpu")
    slots = ({key.rsplit(".", 1)[0]: torch.empty((), dtype=torch.float32, device=slot_device)
              for key in plan.quantizable} if plan.weight_dtype is not None and is_fp8(plan.weight_dtype) else {})
    kept_scales: dict[str, torch.Tensor | None] = dict.fromkeys(slots)
    for key, tensor in tensors:
        layer = key.rsplit(".", 1)[0]
        file_scale = scales.get(layer) if key.endswith(".weight") else None
        out = outputs[key] if outputs is not None else _output_for(key, tensor, plan, device, file_scale)
        state[key], scale = fill_output(out, tensor, device, file_scale)
        if scale is not None and scale is not file_scale and scale.dim() == 0 and layer in slots:
            scale = slots[layer].copy_(scale)
        if scale is not None:
            kept_scales[layer] = scale.to(device=state[key].device, dtype=torch.float32)
        del tensor
    model.load_state_dict(state, strict=True, assign=True)
    for layer, scale in kept_scales.items():
        if scale is None:
            continue
        module = model.get_submodule(layer)
        if not holder(module):
            raise CheckpointError(f"'{layer}' is stored in fp8 but is not a layer that can compute from fp8.")
        module.weight_scale = as_weight_scale(scale)
    model.requires_grad_(False)
    return model.eval()


def _output_for(key: str, tensor: torch.Tensor, plan: DtypePlan, device: torch.device | str | None,
                file_scale: torch.Tensor | None) -> torch.Tensor | None:
    """The output of one key allocated on arrival (None: adopt the tensor as it is)."""
    (out,) = allocate_outputs({key: tuple(tensor.shape)}, {key: tensor.dtype}, plan, device,
                              [key] if file_scale is not None else (), adopt_unchanged=True).values()
    return out
