"""Core ComfyUI values turned into the Wan family's own embeds, so core encoders can feed our sampler.

Both readers work on the plain data core hands over and never import ComfyUI:

- CONDITIONING is a list of ``[tensor [B, L, D], options]`` entries. Core's umT5-XXL encoder pads every
  prompt to at least 512 tokens and zeroes the padded rows (``zero_out_masked``) instead of passing a
  mask, so a prompt's real length is the index after its last non-zero row. Trimming there gives the
  same tokens our own Wan Text Encode keeps; the DiT pads them back with zeros to its text length, as the
  official Wan code does, so the padding changes nothing.
- CLIP_VISION_OUTPUT carries ``penultimate_hidden_states`` [B, 257, width]: the output of every vision
  block but the last, which is exactly what Wan's image branch reads (our CLIP Vision Encode returns the
  same tensor). Start and end frame are joined along the tokens (514), as first/last-frame models expect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .pipeline import WanTextEmbeds

UMT5_WIDTH = 4096
CLIP_TOKENS = 257


class BridgeInputError(ValueError):
    """A core value that cannot stand for the Wan embeds asked for; the message says what to connect."""


def _entries(conditioning: Any, name: str) -> list[torch.Tensor]:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise BridgeInputError(f"{name}: expected a CONDITIONING (from CLIPTextEncode), got {type(conditioning).__name__}.")
    tensors = []
    for i, entry in enumerate(conditioning):
        tensor = entry[0] if isinstance(entry, (list, tuple)) and entry else None
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            raise BridgeInputError(f"{name}: entry {i} is not a [batch, tokens, width] tensor; "
                                   f"connect the output of CLIPTextEncode.")
        if tensor.shape[-1] != UMT5_WIDTH:
            raise BridgeInputError(
                f"{name}: the text encoder that made this CONDITIONING is {tensor.shape[-1]} wide, but Wan reads "
                f"umT5-XXL ({UMT5_WIDTH}); load umt5_xxl_* with Load CLIP, type 'wan'.")
        if not torch.isfinite(tensor).all():
            raise BridgeInputError(f"{name}: entry {i} holds NaN or infinite values; re-encode the prompt "
                                   f"(an fp16 text encoder can overflow: try bf16 or fp32).")
        tensors += [row for row in tensor]
    return tensors


def real_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """[L, D] -> the rows up to the last non-zero one (at least one row, so an empty prompt stays a prompt)."""
    nonzero = hidden.abs().amax(dim=-1) > 0
    length = int(nonzero.nonzero().max()) + 1 if bool(nonzero.any()) else 1
    return hidden[:length]


def text_embeds_from_conditioning(positive: Sequence, negative: Sequence | None = None) -> WanTextEmbeds:
    """Each entry (and batch row) of `positive` becomes one prompt section of the video, in order, as
    'a | b' does in Wan Text Encode; `negative` must hold one prompt."""
    prompts = tuple(real_tokens(row).float().cpu() for row in _entries(positive, "positive"))
    if negative is None:
        return WanTextEmbeds(prompts, None)
    rows = _entries(negative, "negative")
    if len(rows) != 1:
        raise BridgeInputError(f"negative: holds {len(rows)} prompts; Wan takes one negative prompt "
                               f"(combine them into one text instead).")
    return WanTextEmbeds(prompts, real_tokens(rows[0]).float().cpu())


def _hidden_states(output: Any, name: str) -> torch.Tensor:
    states = getattr(output, "penultimate_hidden_states", None)
    if states is None and isinstance(output, dict):
        states = output.get("penultimate_hidden_states")
    if not isinstance(states, torch.Tensor):
        raise BridgeInputError(f"{name}: expected a CLIP_VISION_OUTPUT (from CLIP Vision Encode), got "
                               f"{type(output).__name__}.")
    if states.dim() != 3 or states.shape[0] == 0 or states.shape[1] == 0:
        raise BridgeInputError(
            f"{name}: CLIP vision tokens of shape {tuple(states.shape)}; Wan reads ViT-H/14 output "
            f"[images, {CLIP_TOKENS}, 1280] — load clip_vision_h.safetensors with Load CLIP Vision.")
    return states


def clip_embeds_from_vision_output(start: Any, end: Any | None = None, strength: float = 1.0) -> torch.Tensor:
    """[1, 257, width] for a start image (several images are averaged, as our encoder does), or
    [1, 514, width] with an end image, times `strength`."""
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise BridgeInputError(f"strength must be a finite number, got {strength!r}.")
    parts = [_hidden_states(start, "clip_vision_output")]
    if end is not None:
        parts.append(_hidden_states(end, "clip_vision_output_end"))
        if parts[1].shape[-1] != parts[0].shape[-1]:
            raise BridgeInputError("clip_vision_output_end comes from another CLIP vision model than the start "
                                   f"image ({parts[1].shape[-1]} vs {parts[0].shape[-1]} wide); use one model.")
    feats = torch.cat([p.float().mean(dim=0, keepdim=True) for p in parts], dim=1).cpu()
    if not torch.isfinite(feats).all():
        raise BridgeInputError("clip_vision_output holds NaN or infinite values; re-encode the image.")
    return feats * strength
