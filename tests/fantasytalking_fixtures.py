"""Tiny FantasyTalking files for tests: random weights under the real key names and layouts.

    sd = random_fantasytalking(dit_config, seed=0)                 # flat "proj_model.*" / "audio_processor.*"
    path = write_tiny_fantasytalking(tmp_path / "ft.ckpt", dit_config)       # nested .ckpt layout
    path = write_tiny_fantasytalking(tmp_path / "ft.safetensors", dit_config)  # flat safetensors layout

The official processors start at zero (`zero=True` gives that untrained state); random ones are drawn
at a scale that makes the audio term visible in a tiny DiT's output.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from slipstream.models.wan.fantasytalking import AUDIO_IN_DIM, PROC_PREFIX, PROJ_PREFIX, expected_shapes


def random_fantasytalking(dit_config, seed: int = 0, proj_dim: int = 64, audio_dim: int = AUDIO_IN_DIM,
                          zero: bool = False, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A flat FantasyTalking state dict matching `dit_config` (every block), random or zero processors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in expected_shapes(dit_config.dim, dit_config.num_layers, proj_dim, audio_dim).items():
        if key.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("norm.bias"):
            value = 0.1 * torch.randn(shape, generator=g)
        elif key.startswith(PROC_PREFIX) and zero:
            value = torch.zeros(shape)
        else:
            value = torch.randn(shape, generator=g) * shape[-1] ** -0.5
        sd[key] = value.to(dtype)
    return sd


def nested(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The official .ckpt layout: {"proj_model": {...}, "audio_processor": {...}}."""
    out: dict[str, dict[str, torch.Tensor]] = {"proj_model": {}, "audio_processor": {}}
    for key, value in sd.items():
        outer = "proj_model" if key.startswith(PROJ_PREFIX) else "audio_processor"
        out[outer][key.split(".", 1)[1]] = value
    return out


def write_tiny_fantasytalking(path, dit_config, seed: int = 0, proj_dim: int = 64, zero: bool = False,
                              dtype: torch.dtype = torch.float32) -> str:
    """Write a tiny FantasyTalking file for `dit_config`: nested torch pickle for .ckpt/.pt/.pth,
    flat safetensors for .safetensors. Returns the path as a string."""
    path = str(path)
    sd = random_fantasytalking(dit_config, seed, proj_dim, zero=zero, dtype=dtype)
    os.makedirs(Path(path).parent, exist_ok=True)
    if path.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(nested(sd), path)
    return path
