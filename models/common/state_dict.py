"""Reading a model from its checkpoint keys: its size (the released files carry no config) and its weights.

A model whose config is read from its tensor shapes (Anima's DiT and Qwen3) describes how to pick
and rename its keys once, as a function over a state dict; the same function then serves a state
dict in memory (`load_built_on_meta`) and a file read tensor by tensor (`load_file_built_on_meta`,
run over the header's shapes), so both give the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..checkpoint import (
    PICKLE_EXTS,
    check_state_dict,
    load_state_dict,
    read_safetensors_header,
    refuse_non_float,
)
from .loading import DtypePlan, allocate_outputs, assign_weights, read_safetensors, safetensors_dtype


def count_numbered(keys: Iterable[str], prefix: str) -> int:
    """How many numbered children `prefix` has: 1 + the highest N of keys `<prefix>N.…` (0 if none).

    The highest index, not the number of distinct ones, so a gap left by a pruned layer still
    fails the key check later instead of building a shorter model.
    """
    highest = -1
    for key in keys:
        if key.startswith(prefix):
            index = key[len(prefix):].split(".", 1)[0]
            if index.isdigit():
                highest = max(highest, int(index))
    return highest + 1


def load_built_on_meta(factory: Callable[[], nn.Module], sd: Mapping[str, torch.Tensor], what: str,
                       dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """Build a module on `meta` (no memory), check every key and shape of `sd` against it (naming
    `what` in the error), then let it adopt the tensors — floating ones cast to `dtype` if given,
    all moved to `device` — frozen, in eval mode.

    The loader for a state dict already in memory (pickled files, tests, callers holding one);
    `load_file_built_on_meta` is the same for a file, streamed tensor by tensor.
    """
    with torch.device("meta"):
        model = factory()
    expected = model.state_dict()
    check_state_dict({k: tuple(v.shape) for k, v in expected.items()}, sd, what)
    refuse_non_float({k: v.dtype for k, v in expected.items()}, {k: v.dtype for k, v in sd.items()}, what)
    tensors = {k: (v.to(device=device, dtype=dtype) if dtype is not None and v.is_floating_point()
                   else v.to(device=device)) for k, v in sd.items()}
    model.load_state_dict(tensors, assign=True)
    return model.eval().requires_grad_(False)


Select = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def load_file_built_on_meta(path: str, select: Select, factory_for: Callable[[Mapping[str, torch.Tensor]],
                            Callable[[], nn.Module]], what: str, dtype: torch.dtype | None = None,
                            device: torch.device | str = "cpu") -> nn.Module:
    """`load_built_on_meta` for a checkpoint file, without holding the file in RAM beside the model.

    `select(sd)` returns the model's tensors keyed by model key (prefix stripped, extra tensors
    dropped) and passes the values through untouched; `factory_for(selected)` builds the model
    from their shapes. For safetensors both see meta tensors made from the header; then every
    output is allocated in its final dtype and filled as the file is read (models/common/loading.py).
    Pickled files are loaded whole and take the in-memory path.
    """
    if path.lower().endswith(PICKLE_EXTS):
        sd = select(load_state_dict(path))
        return load_built_on_meta(factory_for(sd), sd, what, dtype, device)
    header, _ = read_safetensors_header(path)
    stored = {k: safetensors_dtype(path, k, v["dtype"]) for k, v in header.items()}
    meta = {k: torch.empty(v["shape"], dtype=stored[k], device="meta") for k, v in header.items()}
    file_key_of = {id(t): k for k, t in meta.items()}
    selected = select(meta)
    source = {k: file_key_of[id(t)] for k, t in selected.items()}
    with torch.device("meta"):
        model = factory_for(selected)()
    expected = model.state_dict()
    check_state_dict({k: tuple(v.shape) for k, v in expected.items()}, selected, what)
    refuse_non_float({k: v.dtype for k, v in expected.items()}, {k: v.dtype for k, v in selected.items()}, what)
    shapes = {k: tuple(t.shape) for k, t in selected.items()}
    dtypes = {k: t.dtype for k, t in selected.items()}
    plan = DtypePlan(dtype, None, frozenset())
    outputs = allocate_outputs(shapes, dtypes, plan, device)
    direct = {source[k]: out for k, out in outputs.items() if out.dtype == dtypes[k] and out.device.type == "cpu"}
    model_key_of = {file_key: k for k, file_key in source.items()}
    tensors = ((model_key_of[k], t) for k, t in read_safetensors(path, list(source.values()), lambda key, d: True,
                                                                  out=direct))
    return assign_weights(model, tensors, plan, device, outputs=outputs)


def linear_weight_count(sd: Mapping[str, torch.Tensor]) -> int:
    """How many 2-D `.weight` tensors a state dict holds (at least 1): the progress total of a build that
    converts Linear layers one by one."""
    return max(1, sum(1 for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2))
