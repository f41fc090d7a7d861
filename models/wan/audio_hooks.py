"""The seam between the Wan DiT and the speech-driven models (MultiTalk / InfiniteTalk, FantasyTalking).

Those models add weights to every block and a projector at the top; at sampling time they need the
speech features of the frames being made. The DiT knows none of them: it calls the hooks of an
`AudioAdapter` attached with `WanDiT.attach_audio(adapter)` and of the per-forward `BlockAudio`
state the adapter prepares from an `AudioConditioning`.

    adapter = SomeFamilyAdapter.from_file(path, dit)      # attaches its per-block modules to dit.blocks[i]
    dit.attach_audio(adapter)
    v = dit(x, t, context, clip_fea, y, audio=conditioning)   # conditioning: that family's features

Where the hooks sit in a block (official order of both families):

    y = self_attn(...)            -> state.self_attention(attn, q, k, inputs)      q, k after RoPE
    x = x + y·gate
    x = x + cross_attn(...)       -> state.cross_attention(attn, q, inputs)        added before `o`
                                  -> state.after_cross_attention(block, x, inputs) added to x
    x = x + ffn(...)·gate

Per-block weights live in the blocks themselves (e.g. `blocks.N.audio_cross_attn.*`), so block swap
moves them with their block and int8/fp8 storage applies to them like to any block Linear; the
projector lives on the adapter, which stays on the compute device like the text embedding.

Audio guidance (text, audio and neither, as the official multi-guidance) asks the conditioning for
its `null()` branch; streaming and context windows ask for `frames(start, count)`: the features of
video frames [start, start + count).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from .dit import BlockInputs, WanDiT


@runtime_checkable
class AudioConditioning(Protocol):
    """Speech features of one family for a run of video frames (one or more speakers)."""

    family: str          # the adapter family it feeds, e.g. "multitalk" or "fantasytalking"
    num_frames: int      # video frames covered

    def null(self) -> AudioConditioning:
        """The no-audio branch of audio guidance, as the official code builds it."""
        ...

    def frames(self, start: int, count: int) -> AudioConditioning:
        """The features of video frames [start, start + count) (streaming clips, context windows)."""
        ...


class BlockAudio(Protocol):
    """Per-forward state an adapter prepares; the blocks call its hooks in order, block by block."""

    def self_attention(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, inputs: BlockInputs) -> None:
        """Sees the self-attention's q, k ([B, L, heads, head_dim], after RoPE) of the current block."""
        ...

    def cross_attention(self, attn: nn.Module, q: torch.Tensor, inputs: BlockInputs) -> torch.Tensor | None:
        """An extra [B, L, dim] term added to the cross-attention output before its `o` projection."""
        ...

    def after_cross_attention(self, block: nn.Module, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor | None:
        """An extra [B, L, dim] term added to the fp32 residual stream after the cross-attention."""
        ...


class AudioAdapter(nn.Module):
    """Base of a family's adapter: holds the top-level projector, prepares the per-forward state."""

    family: str = ""

    def attach(self, dit: WanDiT) -> None:
        """Add this family's per-block modules to `dit.blocks` (called by `WanDiT.attach_audio`)."""
        raise NotImplementedError

    def prepare(self, conditioning: AudioConditioning, *, batch: int, grid: tuple[int, int, int],
                device: torch.device, dtype: torch.dtype) -> BlockAudio:
        """The state the blocks of one forward use, for a latent batch of `batch` on `grid` (f, h, w)."""
        raise NotImplementedError


def check_conditioning(adapter: AudioAdapter | None, conditioning: AudioConditioning | None, model: str) -> None:
    """Refuse audio a model cannot use, and a speech model run without any, with what to connect."""
    if conditioning is None:
        return
    if adapter is None:
        raise ValueError(f"{model} has no speech model attached, but audio conditioning was given. Load the "
                         f"{conditioning.family} model in the Wan model loader, or leave the audio input empty.")
    if adapter.family != conditioning.family:
        raise ValueError(f"the audio features are for {conditioning.family}, but {model} carries a "
                         f"{adapter.family} model: encode the audio with the {adapter.family} embeds node.")
