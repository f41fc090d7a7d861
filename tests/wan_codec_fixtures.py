"""Shared by the Wan codec tests (VAE, umT5, CLIP vision): seeded random weights for the tiny towers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from slipstream.models.wan.weights import build_on_meta


def random_state_dict(factory: Callable[[], torch.nn.Module], seed: int,
                      draw: Callable[[str, torch.Size, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the model `factory` builds (on meta: nothing allocated but the result), as
    draw(key, shape, standard-normal noise of that shape), the noise drawn in state-dict order."""
    gen = torch.Generator().manual_seed(seed)
    return {name: draw(name, t.shape, torch.randn(t.shape, generator=gen))
            for name, t in build_on_meta(factory).state_dict().items()}
