"""Putting checkpoint tensors into a model built on the `meta` device.

Wan's encoders ship in several layouts (official bare names, ComfyUI all-in-one files with a `vae.`
or `text_encoders.umt5xxl.transformer.` prefix, kijai's `model.` prefix, fp8 "scaled" files). Every
loader here does the same four things, so they live in one place:

1. find where the sub-model sits in the file by an *anchor* key (any prefix is accepted, so a new
   repackaging does not need a new rule),
2. dequantize scaled fp8 weights if the file has them,
3. compare names and shapes with the meta model and name every missing / misshapen tensor,
4. assign the tensors into the meta model (`load_state_dict(assign=True)`): the file's tensors
   become the parameters, so loading never holds a second full copy of the weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, MutableMapping

import torch
from torch import nn

from ..checkpoint import CheckpointError, check_state_dict

FP8_DTYPES = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
# Marker tensors that ComfyUI's quantized formats carry next to real weights.
_QUANT_MARKERS = ("scaled_fp8",)
_QUANT_SUFFIXES = (".comfy_quant", ".scale_input", ".input_scale")
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")


def find_prefix(keys: Iterable[str], anchors: Iterable[str]) -> tuple[str, str] | None:
    """(prefix, anchor) for the first anchor some key ends with, where the prefix is '' or ends in '.'."""
    keys = list(keys)
    for anchor in anchors:
        for key in keys:
            if key.endswith(anchor):
                prefix = key[: len(key) - len(anchor)]
                if prefix == "" or prefix.endswith("."):
                    return prefix, anchor
    return None


def take_prefixed(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, with the prefix removed (tensors are shared, not copied)."""
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def dequantize_scaled_fp8(sd: MutableMapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """In place: fp8 weights times their `.scale_weight`/`.weight_scale` (1 if absent) in `dtype`;
    quantization markers removed. Files without fp8 tensors are left untouched."""
    if not any(v.dtype in FP8_DTYPES for v in sd.values()):
        return
    for key in [k for k in sd if k in _QUANT_MARKERS or k.endswith(_QUANT_SUFFIXES)]:
        del sd[key]
    scales = {}
    for key in [k for k in sd if k.endswith(_SCALE_SUFFIXES)]:
        layer = key.rsplit(".", 1)[0]
        scales[layer + ".weight"] = sd.pop(key)
    for key, tensor in list(sd.items()):
        if tensor.dtype in FP8_DTYPES:
            scale = scales.pop(key, None)
            value = tensor.to(torch.float32)
            if scale is not None:
                value = value * scale.to(torch.float32)
            sd[key] = value.to(dtype)
    if scales:
        raise CheckpointError(f"Scale tensor(s) without an fp8 weight: {', '.join(sorted(scales)[:5])}. "
                              "The file mixes quantization formats; use an unquantized or a ComfyUI-made fp8 file.")


def storage_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most of the weights (fp8 counts as bf16, the dtype it computes in)."""
    counts: Counter[torch.dtype] = Counter()
    for v in sd.values():
        if v.is_floating_point():
            counts[torch.bfloat16 if v.dtype in FP8_DTYPES else v.dtype] += v.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Instantiate a module without allocating its weights."""
    with torch.device("meta"):
        return factory()


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def assign_weights(module: nn.Module, sd: MutableMapping[str, torch.Tensor], what: str,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                   consume: bool = False) -> nn.Module:
    """Check `sd` against the meta `module` and make its tensors the module's parameters.

    Floating tensors are cast to `dtype` (default: the file's main dtype) and moved to `device`.
    With `consume=True` each source tensor is dropped from `sd` as soon as it is converted, so a
    dtype change costs one tensor of extra memory instead of a second model.
    """
    check_state_dict(expected_shapes(module), sd, what)
    dtype = dtype or storage_dtype(sd)
    ready: dict[str, torch.Tensor] = {}
    for key in list(sd):
        tensor = sd.pop(key) if consume else sd[key]
        if tensor.is_floating_point():
            tensor = tensor.to(dtype=dtype)
        if device is not None:
            tensor = tensor.to(device=device)
        ready[key] = tensor
    module.load_state_dict(ready, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
