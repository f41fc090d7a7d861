"""Filling a meta-built model from GGUF tensors: which Linears stay packed, what is expanded at load.

Shared by the GGUF loaders (Wan DiT, umT5). The rule: a Linear the caller lists as packable whose
file weight is quantized becomes a `GGUFLinear` holding the packed bytes (expanded per call);
every other tensor is dequantized once into the compute dtype, except half-precision weights of
packable Linears, which stay as stored (`CastLinear` widens them per call). The model adopts the
tensors (`assign=True`), so nothing is allocated twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..kernels.gguf_dequant import QuantType
from ..kernels.gguf_linear import GGUFLinear
from .gguf_file import GGUFTensor

HALF = (torch.float16, torch.bfloat16)


def fill_from_gguf(model: nn.Module, tensors: Mapping[str, GGUFTensor], packable: Iterable[str],
                   dtype: torch.dtype, device: torch.device | str | None) -> int:
    """Load `tensors` (model key -> GGUF tensor, already checked against the model's shapes) into the
    meta-built `model`. `packable`: module paths of the Linears that may keep quantized weights.
    Returns how many Linears stay packed."""
    packable = set(packable)
    packed = {name for name in packable if tensors[name + ".weight"].quantized}
    for name in packed:
        _replace(model, name, _gguf_linear_like(model.get_submodule(name), tensors[name + ".weight"].qtype))
    target = torch.device(device) if device is not None else torch.device("cpu")
    state = {}
    for key, tensor in tensors.items():
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight" and layer in packed:
            state[key] = tensor.packed().to(target)
            continue
        stored = tensor.qtype.float_dtype
        keep = leaf == "weight" and layer in packable and stored in HALF
        state[key] = tensor.to_float(stored if keep else dtype).to(target)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    return len(packed)


def default_compute_dtype(probe: QuantType) -> torch.dtype:
    """The compute dtype when the caller chose none: a float file's own, bf16 for quantized files."""
    return probe.float_dtype if probe.float_dtype is not None else torch.bfloat16


def describe_types(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()))


def _gguf_linear_like(linear: nn.Linear, qtype: QuantType) -> GGUFLinear:
    with torch.device("meta"):
        return GGUFLinear(linear.in_features, linear.out_features, qtype, bias=linear.bias is not None)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
