"""Reading a model from its checkpoint keys: its size (the released files carry no config) and its weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..checkpoint import check_state_dict, refuse_non_float


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

    The simple loader, for a state dict already in memory (Anima's DiT and Qwen3, a few GB); Wan's
    loaders stream from the file tensor by tensor instead (models/wan/loading.py).
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
