"""VACE on the Wan DiT (Wan 2.1 VACE 1.3B/14B, Wan 2.2 Fun-VACE A14B): control video, mask and
reference images steer a text-to-video model through a second, shorter stack of blocks.

A VACE checkpoint is a t2v DiT plus `vace_patch_embedding` (a Conv3d like `patch_embedding`) and
`vace_blocks.N` (Wan blocks with an `after_proj` Linear, and a `before_proj` on block 0). The VACE
context of one input is [96, T, h, w]: the normalised latents of the *inactive* part of the control
video (outside the mask) and of its *reactive* part (inside), 16 channels each, then the mask as 64
channels (its value at each of the 8×8 pixels of a latent cell). Reference images come first in
time, as extra latent frames with a zero reactive latent and a zero mask, and are cut off the
result after sampling.

    c0 = vace_patch_embedding(context) tokens;  c = before_proj(c0) + x0      (x0: embedded noise)
    for VACE block n, after main block vace_layers[n]:
        c = block_n(c);  x = x + after_proj_n(c) · strength                   (the hint)

Several VACE inputs (chained encode nodes) each run their own stream `c` through the same VACE
blocks and add their own hint with their own strength, as ComfyUI does; with one input and
strength s this is the official `VaceWanModel` with `context_scale` s. The official model computes
every hint before the main blocks; hints read only x0, so running VACE block n right after main
block vace_layers[n] gives the same numbers and keeps one hint alive at a time, and block swap
sees the VACE blocks in the order they run (models/wan/pipeline.py lists them so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.cast_linear import CastLinear
from .config import WanDiTConfig, tiny
from .dit import BlockInputs, BlockRunner, WanBlock, WanDiT, run_block

VACE_IN_DIM = 96           # 16 inactive + 16 reactive latent channels + 64 mask channels
MASK_CHANNELS = 64         # 8 × 8 pixels per latent cell
LATENT_CHANNELS = 16
VAE_STRIDE = (4, 8, 8)


# ---------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class VaceInput:
    """One VACE input as the sampler receives it (the output of Wan VACE Encode).

    context: [96, T, h, w] float32: normalised inactive + reactive latents, then the 64-channel
    mask; T = reference frames + latent frames of the video. ref_frames: how many of the first
    latent frames are reference images (cut off the sampled latent).
    """

    context: torch.Tensor
    strength: float = 1.0
    ref_frames: int = 0


def check_chain(inputs: Sequence[VaceInput]) -> None:
    """Chained VACE inputs share one latent, so they must agree on its shape."""
    if not inputs:
        return
    first = inputs[0]
    for other in inputs[1:]:
        if tuple(other.context.shape) != tuple(first.context.shape) or other.ref_frames != first.ref_frames:
            raise ValueError(
                f"Chained VACE inputs must describe the same video: one is {tuple(first.context.shape)} with "
                f"{first.ref_frames} reference frame(s), another {tuple(other.context.shape)} with "
                f"{other.ref_frames}. Give every Wan VACE Encode of the chain the same width, height, "
                "num_frames and number of reference images.")


def empty_context(latent_shape: Sequence[int]) -> VaceInput:
    """What a VACE model sees when no VACE input is connected (as ComfyUI does): a zero raw latent
    for both halves (normalised here) and a mask of ones, at strength 1."""
    from .vae import normalize_latent

    _, frames, h, w = latent_shape
    zero = normalize_latent(torch.zeros(1, LATENT_CHANNELS, frames, h, w))[0]
    return VaceInput(torch.cat([zero, zero, torch.ones(MASK_CHANNELS, frames, h, w)]))


# ---------------------------------------------------------------------------------- the context


def mask_to_latent(mask: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """A pixel mask [F, H, W] -> [64, T, H/8, W/8]: each latent cell's 8×8 pixels as channels, then
    frames resampled by nearest-exact to the latent's T (the official `vace_encode_masks`)."""
    frames, height, width = mask.shape
    sh, sw = VAE_STRIDE[1:]
    cells = mask.reshape(frames, height // sh, sh, width // sw, sw).permute(2, 4, 0, 1, 3)
    cells = cells.reshape(sh * sw, frames, height // sh, width // sw)
    return F.interpolate(cells[None].float(), size=(latent_frames, height // sh, width // sw),
                         mode="nearest-exact")[0]


def split_by_mask(video: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Video [3, F, H, W] in -1..1 and a 0/1 mask [F, H, W] -> (inactive, reactive): the video outside
    and inside the mask, grey (0) elsewhere."""
    m = mask[None].to(video.dtype)
    return video * (1 - m), video * m


def build_context(inactive_latent: torch.Tensor, reactive_latent: torch.Tensor, mask: torch.Tensor,
                  ref_latents: torch.Tensor | None = None) -> torch.Tensor:
    """[96, R + T, h, w] from normalised latents [16, T, h, w] ×2, the pixel mask [F, H, W] and R
    normalised reference latents [16, R, h, w] (reactive half and mask zero for them)."""
    frames = inactive_latent.shape[1]
    latent = torch.cat([inactive_latent, reactive_latent])
    mask64 = mask_to_latent(mask, frames)
    if ref_latents is not None and ref_latents.shape[1]:
        latent = torch.cat([torch.cat([ref_latents, torch.zeros_like(ref_latents)]), latent], dim=1)
        mask64 = torch.cat([mask64.new_zeros(MASK_CHANNELS, ref_latents.shape[1], *mask64.shape[2:]), mask64], dim=1)
    return torch.cat([latent.float(), mask64])


# ---------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class VaceBlockInputs(BlockInputs):
    """BlockInputs plus the VACE streams of one forward: tokens [B, L, dim] fp32 per input."""

    vace_tokens: tuple[torch.Tensor, ...] = ()
    vace_strengths: tuple[float, ...] = ()


class WanVaceBlock(WanBlock):
    """A Wan block that runs on a VACE stream and emits the hint `after_proj(c)`."""

    def __init__(self, config: WanDiTConfig, first: bool):
        super().__init__(config)
        if first:
            self.before_proj = CastLinear(config.dim, config.dim)
        self.after_proj = CastLinear(config.dim, config.dim)

    def forward(self, streams: tuple[torch.Tensor, ...], x0: torch.Tensor,  # type: ignore[override]
                inputs: BlockInputs) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """All streams of this forward in one module call, so block swap loads the block once."""
        cd = inputs.compute_dtype
        out, hints = [], []
        for c in streams:
            if hasattr(self, "before_proj"):
                c = self.before_proj(c.to(cd)).float() + x0
            c = super().forward(c, inputs)
            out.append(c)
            hints.append(self.after_proj(c.to(cd)).float())
        return tuple(out), tuple(hints)


class WanVaceDiT(WanDiT):
    """WanDiT with the VACE stack. `forward(..., vace_context=[ctx, …], vace_strength=[s, …])`:
    each ctx [B, vace_in_dim, F, H, W] at the latent's size; without them it is the plain t2v model."""

    def __init__(self, config: WanDiTConfig, attention_backend: str = "auto"):
        super().__init__(config, attention_backend)
        self.vace_patch_embedding = nn.Conv3d(config.vace_in_dim, config.dim, kernel_size=config.patch_size,
                                              stride=config.patch_size)
        self.vace_blocks = nn.ModuleList(WanVaceBlock(config, first=n == 0) for n in range(len(config.vace_layers)))
        self.vace_after = {layer: n for n, layer in enumerate(config.vace_layers)}

    def _block_linears(self) -> list[tuple[str, CastLinear]]:
        return [(name, mod) for name, mod in self.named_modules()
                if name.startswith(("blocks.", "vace_blocks.")) and isinstance(mod, CastLinear)]

    def quantizable_keys(self) -> list[str]:
        """The main and the VACE blocks' Linear weights (kijai's fp8 VACE files store both in fp8)."""
        return [f"{name}.weight" for name, _ in self._block_linears()]

    def use_fp8_matmul(self) -> int:
        return sum(mod.use_fp8_matmul() for _, mod in self._block_linears())

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,  # type: ignore[override]
                clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
                vace_context: Sequence[torch.Tensor] | None = None, vace_strength: Sequence[float] | None = None,
                block_runner: BlockRunner | None = None, **options) -> torch.Tensor:
        tokens, inputs = self.embed(x, timestep, context, clip_fea, y, vace_context=vace_context,
                                    vace_strength=vace_strength, **options)
        return self.unembed(self.forward_blocks(tokens, inputs, block_runner), inputs)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,  # type: ignore[override]
              clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
              vace_context: Sequence[torch.Tensor] | None = None, vace_strength: Sequence[float] | None = None,
              **options) -> tuple[torch.Tensor, BlockInputs]:
        tokens, inputs = super().embed(x, timestep, context, clip_fea, y, **options)
        if not vace_context:
            return tokens, inputs
        strengths = tuple(float(s) for s in (vace_strength if vace_strength is not None else [1.0] * len(vace_context)))
        self._check_vace(x, vace_context, strengths)
        weight = self.vace_patch_embedding.weight
        streams = tuple(self.vace_patch_embedding(c.to(device=x.device, dtype=weight.dtype)).flatten(2)
                        .transpose(1, 2).float() for c in vace_context)
        base = {f.name: getattr(inputs, f.name) for f in fields(BlockInputs)}
        return tokens, VaceBlockInputs(**base, vace_tokens=streams, vace_strengths=strengths)

    def forward_blocks(self, tokens: torch.Tensor, inputs: BlockInputs,
                       block_runner: BlockRunner | None = None) -> torch.Tensor:
        """The main blocks through `block_runner`; VACE block n right after main block vace_layers[n]."""
        streams = getattr(inputs, "vace_tokens", ())
        if not streams:
            return super().forward_blocks(tokens, inputs, block_runner)
        runner = block_runner or run_block
        x0 = tokens
        for index, block in enumerate(self.blocks):
            tokens = runner(index, block, tokens, inputs)
            n = self.vace_after.get(index)
            if n is not None:
                streams, hints = self.vace_blocks[n](streams, x0, inputs)
                for hint, strength in zip(hints, inputs.vace_strengths, strict=True):
                    tokens = tokens + hint * strength
        return tokens

    def _check_vace(self, x: torch.Tensor, contexts: Sequence[torch.Tensor], strengths: tuple[float, ...]) -> None:
        want = (x.shape[0], self.config.vace_in_dim, *x.shape[2:])
        for i, c in enumerate(contexts):
            if tuple(c.shape) != want:
                raise ValueError(f"vace_context[{i}] must be [B, {self.config.vace_in_dim}, F, H, W] = {want} "
                                 f"(the latent's batch and size), got {tuple(c.shape)}")
        if len(strengths) != len(contexts):
            raise ValueError(f"{len(contexts)} VACE contexts but {len(strengths)} strengths")


def tiny_vace(num_layers: int = 4, vace_blocks: int = 2, **kw) -> WanDiTConfig:
    """A few-MB VACE config with the real structure (tests and demos): VACE blocks every
    num_layers // vace_blocks blocks, 96 context channels."""
    step = num_layers // vace_blocks
    return replace(tiny("t2v", num_layers=num_layers, **kw), name="tiny-vace",
                   vace_layers=tuple(range(0, num_layers, step)), vace_in_dim=VACE_IN_DIM)
