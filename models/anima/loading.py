"""What the Anima loader nodes assemble, for any host: the DiT for ComfyUI's own Cosmos DiT, and
the VAE's image functions.

Inside a ComfyUI without native Anima, ComfyUI's MiniTrainDIT runs the DiT with our LLM adapter
(host/comfy_anima.py builds it: that layer cannot import models/), so this module hands the host
what it needs from the file: the state dict without its prefix, the DiT's constructor arguments
and the adapter built on meta. Anima's VAE is Wan 2.1's; an IMAGE is encoded one image at a time
so a batch of references is never taken for video frames. The nodes (nodes/anima_loaders.py) only
resolve paths, pick devices and wrap the results in the host's MODEL / CLIP / VAE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_state_dict, strip_prefix
from ..wan.vae import SPATIAL_FACTOR, WanVAE
from .dit import STATE_DICT_PREFIXES, comfy_dit_kwargs, config_from_state_dict
from .llm_adapter import LLMAdapter, adapt_text


def comfy_dit_parts(path: str) -> tuple[dict[str, torch.Tensor], dict, nn.Module, Callable]:
    """(state dict without prefix, MiniTrainDIT kwargs, LLM adapter on CPU, adapt_text) of an Anima file."""
    sd, _ = strip_prefix(load_state_dict(path), STATE_DICT_PREFIXES)
    cfg = config_from_state_dict(sd)
    if cfg.adapter is None:
        raise CheckpointError(f"{path} has no llm_adapter.* tensors: it is a Cosmos-Predict2 model, not Anima.")
    with torch.device("meta"):
        adapter = LLMAdapter(cfg.adapter)
    return sd, comfy_dit_kwargs(cfg), adapter.to_empty(device="cpu"), adapt_text


def image_vae_functions(vae: WanVAE, out_device: torch.device | str,
                        ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(encode, decode) between IMAGE batches [B, H, W, 3] in 0..1 and raw latents [B, 16, 1, H/8, W/8]."""

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        h, w = (pixels.shape[1] // SPATIAL_FACTOR) * SPATIAL_FACTOR, (pixels.shape[2] // SPATIAL_FACTOR) * SPATIAL_FACTOR
        video = (pixels[:, :h, :w].movedim(-1, 1) * 2 - 1)[:, :, None]
        return torch.cat([vae.encode(v[None]) for v in video]).to(out_device)

    def decode(latent: torch.Tensor) -> torch.Tensor:
        latent = latent[:, :, None] if latent.ndim == 4 else latent
        video = vae.decode(latent)                                       # [B, 3, F, H, W]
        frames = video.movedim(1, -1).flatten(0, 1)                      # [B*F, H, W, 3]
        return ((frames + 1) / 2).clamp(0, 1).to(out_device)

    return encode, decode
