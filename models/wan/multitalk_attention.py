"""MultiTalk / InfiniteTalk inside a Wan block: the audio cross-attention, the reference attention
map and the speaker label RoPE, and the per-forward hook state the DiT calls (audio_hooks.BlockAudio).

What one block does with speech (official order, after the text cross-attention):

    x = x + audio_scale · audio_cross_attn(norm_x(x), audio tokens)

`audio_cross_attn` (official names `q_linear`, `kv_linear`, `proj`) lets the tokens of latent frame n
attend only to the audio tokens of latent frame n (32 per speaker). With two speakers the official
model first finds which speaker each video token belongs to: in the block's self-attention it
measures, for every token, how much attention goes to each speaker's region of the first latent
frame (`reference_attention_map`: softmax(q·k_ref/√d) summed over a region's tokens, divided by its
size, averaged over heads), then gives each token a 1-D RoPE position (`label_positions`): speaker 1
tokens spread over [0, 4], speaker 2 tokens over [20, 24] (each rescaled from its own min..max),
background tokens 12; the audio keys sit at 2 (speaker 1) and 22 (speaker 2). So a token attends
mostly to the audio of the speaker it belongs to. One speaker needs none of that (plain attention).

The official model averages the map over two halves of the heads; for an even head count (every
Wan model) that is the mean over all heads, which is what we compute. The map is one attention
whose values are the 0/1 region masks, so it runs through the attention kernel (sdpa) without
materialising the [heads, L, L_ref] probabilities (several GB at 480p for the 14B model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ...kernels.attention import attention
from ...kernels.cast_linear import CastLinear
from ..common.layers import rope_inv_freqs
from .layers import apply_rope

if TYPE_CHECKING:
    from .dit import BlockInputs

# Label RoPE of two speakers (official class_range 24, class_interval 4).
CLASS_RANGE = 24
CLASS_INTERVAL = 4
SPEAKER_RANGES = ((0.0, float(CLASS_INTERVAL)), (float(CLASS_RANGE - CLASS_INTERVAL), float(CLASS_RANGE)))
BACKGROUND_POSITION = float(CLASS_RANGE // 2)
NORMALIZE_EPS = 1e-8


class MultiTalkAudioAttention(nn.Module):
    """Per-frame cross-attention of video tokens to audio tokens (official `SingleStreamMutiAttention`,
    qk_norm off, biases on: the released weights have no q/k norms)."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = CastLinear(dim, dim)
        self.kv_linear = CastLinear(audio_dim, 2 * dim)
        self.proj = CastLinear(dim, dim)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, grid: tuple[int, int, int], *,
                q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
        """x [B, f·h·w, dim] (compute dtype), audio [f, N_a, audio_dim] tokens of each latent frame;
        with `q_positions` [B, L] and `k_positions` [N_a] the label RoPE rotates q and k."""
        b, length, dim = x.shape
        f = grid[0]
        heads = (self.num_heads, dim // self.num_heads)
        q = self.q_linear(x).unflatten(-1, heads)                               # [B, L, H, D]
        k, v = self.kv_linear(audio).unflatten(-1, (2, *heads)).unbind(2)       # [f, N_a, H, D] each
        if q_positions is not None:
            q = rotate_1d(q, q_positions)
            k = rotate_1d(k, k_positions[None].expand(f, -1))
        n_a = k.shape[1]
        q = q.reshape(b * f, length // f, *heads)
        k = k.unsqueeze(0).expand(b, *k.shape).reshape(b * f, n_a, *heads)
        v = v.unsqueeze(0).expand(b, *v.shape).reshape(b * f, n_a, *heads)
        out = attention(q, k, v, backend=backend, layout="bshd").reshape(b, length, dim)
        return self.proj(out)


def rotate_1d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """1-D RoPE of [N, S, H, D] by per-token positions [N, S] (adjacent pairs, frequencies
    1/10000^(2i/D), angles in fp32 as the official `RotaryPositionalEmbedding1D`)."""
    freqs = rope_inv_freqs(x.shape[-1], device=x.device, dtype=torch.float32)
    angles = positions.to(device=x.device, dtype=torch.float32)[..., None] * freqs    # [N, S, D/2]
    return apply_rope(x, torch.cos(angles)[:, :, None], torch.sin(angles)[:, :, None])


def reference_attention_map(q: torch.Tensor, k: torch.Tensor, region_masks: torch.Tensor) -> torch.Tensor:
    """[B, C, L] fp32: for every token, the attention (softmax over the first latent frame's keys,
    mean over heads) that falls in each region, divided by the region's size.

    q, k: [B, L, H, D] self-attention queries/keys after RoPE; region_masks [C, h·w] (0/1) over the
    first latent frame's tokens, which are the first h·w keys. An empty region gives a zero row.
    """
    ref = region_masks.shape[1]
    heads, head_dim = q.shape[2], q.shape[3]
    values = q.new_zeros(q.shape[0], ref, heads, head_dim)
    values[..., :region_masks.shape[0]] = region_masks.t().to(q.dtype)[None, :, None, :]
    summed = attention(q, k[:, :ref], values, backend="sdpa", layout="bshd")     # [B, L, H, D]
    summed = summed[..., :region_masks.shape[0]].float().mean(dim=2)             # [B, L, C]
    sizes = region_masks.float().sum(dim=1).clamp_min(1.0)
    return (summed / sizes).transpose(1, 2)


def label_positions(ref_map: torch.Tensor) -> torch.Tensor:
    """[B, 3, L] map (speaker 1, speaker 2, background) -> [B, L] label RoPE positions."""
    rows = []
    for (low, high), row in zip(SPEAKER_RANGES, ref_map[:, :2].unbind(1), strict=True):
        lo, hi = row.amin(dim=1, keepdim=True), row.amax(dim=1, keepdim=True)
        rows.append((row - lo) / (hi - lo + NORMALIZE_EPS) * (high - low) + low)
    rows.append(torch.full_like(rows[0], BACKGROUND_POSITION))
    table = torch.stack(rows, dim=1)                                             # [B, 3, L]
    return table.gather(1, ref_map.argmax(dim=1, keepdim=True)).squeeze(1)


def audio_key_positions(tokens_per_speaker: int, speakers: int, device: torch.device) -> torch.Tensor:
    """[speakers · tokens] positions of the audio keys: the middle of each speaker's label range."""
    middles = [(low + high) / 2 for low, high in SPEAKER_RANGES[:speakers]]
    return torch.tensor(middles, device=device).repeat_interleave(tokens_per_speaker)


class MultiTalkBlockAudio:
    """The hook state of one forward (audio_hooks.BlockAudio): audio tokens of every latent frame,
    the speakers' token regions, and the reference map carried from a block's self-attention to
    its audio cross-attention."""

    def __init__(self, tokens: torch.Tensor, speakers: int, regions: torch.Tensor | None,
                 audio_scale: float, tokens_per_speaker: int):
        self.tokens = tokens                   # [f, speakers · tokens_per_speaker, audio_dim]
        self.speakers = speakers
        self.regions = regions                 # [3, h·w] speaker 1, speaker 2, background (2 speakers)
        self.audio_scale = audio_scale
        self.k_positions = None if speakers == 1 else audio_key_positions(tokens_per_speaker, speakers,
                                                                          tokens.device)
        self._ref_map: torch.Tensor | None = None

    def self_attention(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, inputs: BlockInputs) -> None:
        if self.speakers > 1:
            self._ref_map = reference_attention_map(q, k, self.regions)

    def cross_attention(self, attn: nn.Module, q: torch.Tensor, inputs: BlockInputs) -> torch.Tensor | None:
        return None

    def after_cross_attention(self, block: nn.Module, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor | None:
        if self.audio_scale == 0.0:
            return None
        q_positions = None
        if self.speakers > 1:
            if self._ref_map is None:
                raise RuntimeError("the MultiTalk audio attention ran before its block's self-attention")
            q_positions = label_positions(self._ref_map)
            self._ref_map = None
        normed = block.norm_x(x).to(inputs.compute_dtype)
        out = block.audio_cross_attn(normed, self.tokens, inputs.grid, q_positions=q_positions,
                                     k_positions=self.k_positions, backend=inputs.attention_backend)
        return out if self.audio_scale == 1.0 else out * self.audio_scale
