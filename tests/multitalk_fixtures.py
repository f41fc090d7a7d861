"""Tiny random MultiTalk / InfiniteTalk speech files under the official key names, for any test.

    cfg = tiny("i2v", text_dim=64, clip_dim=96)                # a tiny Wan 2.1 I2V DiT (with CLIP)
    sd = write_tiny_multitalk(tmp_path / "multitalk.safetensors", cfg)   # also returns the tensors
    adapter = MultiTalkAdapter.from_file(str(path), dit)

The speech features of such a file are [frames, layers, channels] = [.., TINY_LAYERS, TINY_CHANNELS]
unless `layers`/`channels` say otherwise (pass a tiny wav2vec2's hidden-state count and width to pair
the file with that encoder). Weights are drawn at scales that keep every term of the forward visible.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from slipstream.models.wan.config import WanDiTConfig
from slipstream.models.wan.multitalk import multitalk_keys
from slipstream.models.wan.multitalk_conditioning import (
    MultiTalkConditioning,
    audio_windows,
    regions_left_right,
)

TINY_LAYERS = 2          # hidden states per frame (the released encoder gives 12)
TINY_CHANNELS = 16       # their width (768 released)
TINY_INTERMEDIATE = 24
TINY_AUDIO_DIM = 16      # audio token width (768 released)
TINY_TOKENS = 4          # audio tokens per latent frame and speaker (32 released)


def tiny_multitalk_state_dict(config: WanDiTConfig, *, seed: int = 0, layers: int = TINY_LAYERS,
                              channels: int = TINY_CHANNELS, dtype: torch.dtype = torch.float32,
                              prefix: str = "") -> dict[str, torch.Tensor]:
    """Random speech weights for a DiT of `config` (its width and block count), official names."""
    shapes = multitalk_keys(dim=config.dim, num_layers=config.num_layers, frame_width=layers * channels,
                            intermediate=TINY_INTERMEDIATE, audio_dim=TINY_AUDIO_DIM, context_tokens=TINY_TOKENS)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("norm_x.weight") or key.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith(".bias"):
            value = 0.05 * torch.randn(shape, generator=g)
        else:
            value = torch.randn(shape, generator=g) / shape[1] ** 0.5
        sd[prefix + key] = value.to(dtype)
    return sd


def write_tiny_multitalk(path: str | Path, config: WanDiTConfig, **kw) -> dict[str, torch.Tensor]:
    """Write `tiny_multitalk_state_dict(config, **kw)` to a safetensors file; returns the tensors."""
    sd = tiny_multitalk_state_dict(config, **kw)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return sd


def tiny_features(frames: int, *, speakers: int = 1, seed: int = 0, layers: int = TINY_LAYERS,
                  channels: int = TINY_CHANNELS, image_hw: tuple[int, int] = (32, 48),
                  audio_scale: float = 1.0) -> MultiTalkConditioning:
    """Random windowed features of `frames` video frames (4k + 1) for a tiny file; two speakers sit
    left and right of an image of `image_hw` pixels."""
    g = torch.Generator().manual_seed(seed)
    per_speaker = [audio_windows(torch.randn(frames + 3, layers, channels, generator=g), frames)
                   for _ in range(speakers)]
    regions = regions_left_right(*image_hw) if speakers == 2 else None
    return MultiTalkConditioning(torch.stack(per_speaker), regions, audio_scale)
