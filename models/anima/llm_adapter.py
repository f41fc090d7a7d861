"""Anima's LLM adapter: turns Qwen3-0.6B hidden states into the DiT's cross-attention context.

The adapter embeds the prompt's *T5* token ids (the target sequence) and lets them attend to the
Qwen3 hidden states (the source), so the DiT's context is aligned to T5 tokens. Six pre-RMSNorm
blocks (self-attention over the T5 sequence, cross-attention to Qwen, GELU MLP), RoPE on q and k in
both attentions with separate positions for target and source. Key names follow ComfyUI
(`llm_adapter.embed`, `llm_adapter.blocks.N.{self_attn,cross_attn}.{q,k,v,o}_proj`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.cast_linear import CastLinear
from ..common.layers import RMSNorm
from .layers import CastEmbedding, apply_rope, cos_sin, rope_angles

T5_VOCAB = 32128
CONTEXT_MIN_LENGTH = 512   # Anima is trained on contexts zero-padded to 512 rows; shorter ones give black images
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class AdapterConfig:
    source_dim: int = 1024      # Qwen3 hidden size
    model_dim: int = 1024       # = target dim = the DiT's cross-attention context width
    num_layers: int = 6
    num_heads: int = 16
    vocab_size: int = T5_VOCAB
    mlp_ratio: float = 4.0

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads


class AdapterAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.q_proj = CastLinear(query_dim, inner, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_proj = CastLinear(context_dim, inner, bias=False)
        self.k_norm = RMSNorm(head_dim)
        self.v_proj = CastLinear(context_dim, inner, bias=False)
        self.o_proj = CastLinear(inner, query_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope_q: tuple[torch.Tensor, torch.Tensor],
                rope_k: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        b, sq, _ = x.shape
        sk = context.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, sq, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(context).view(b, sk, self.num_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(context).view(b, sk, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, *rope_q)
        k = apply_rope(k, *rope_k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, sq, -1))


class AdapterBlock(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        d = cfg.model_dim
        hidden = int(d * cfg.mlp_ratio)
        self.norm_self_attn = RMSNorm(d)
        self.self_attn = AdapterAttention(d, d, cfg.num_heads, cfg.head_dim)
        self.norm_cross_attn = RMSNorm(d)
        self.cross_attn = AdapterAttention(d, cfg.source_dim, cfg.num_heads, cfg.head_dim)
        self.norm_mlp = RMSNorm(d)
        self.mlp = nn.Sequential(CastLinear(d, hidden), nn.GELU(), CastLinear(hidden, d))

    def forward(self, x, source, rope_target, rope_source, target_mask=None, source_mask=None):
        normed = self.norm_self_attn(x)
        x = x + self.self_attn(normed, normed, rope_target, rope_target, target_mask)
        x = x + self.cross_attn(self.norm_cross_attn(x), source, rope_target, rope_source, source_mask)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """Qwen3 states + T5 ids -> context rows aligned to the T5 ids, width `model_dim`."""

    def __init__(self, cfg: AdapterConfig = AdapterConfig()):
        super().__init__()
        self.config = cfg
        self.embed = CastEmbedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(AdapterBlock(cfg) for _ in range(cfg.num_layers))
        self.out_proj = CastLinear(cfg.model_dim, cfg.model_dim)
        self.norm = RMSNorm(cfg.model_dim)

    def forward(self, source_hidden_states: torch.Tensor, target_input_ids: torch.Tensor,
                target_attention_mask: torch.Tensor | None = None,
                source_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        source = source_hidden_states
        dtype = source.dtype
        x = self.embed(target_input_ids.long(), out_dtype=dtype)
        head_dim = self.config.head_dim
        positions_t = torch.arange(x.shape[1], device=x.device)
        positions_s = torch.arange(source.shape[1], device=x.device)
        rope_t = tuple(c.to(dtype) for c in cos_sin(rope_angles(positions_t, head_dim, ROPE_THETA)))
        rope_s = tuple(c.to(dtype) for c in cos_sin(rope_angles(positions_s, head_dim, ROPE_THETA)))
        t_mask = _additive_mask(target_attention_mask, dtype)
        s_mask = _additive_mask(source_attention_mask, dtype)
        for block in self.blocks:
            x = block(x, source, rope_t, rope_s, t_mask, s_mask)
        return self.norm(self.out_proj(x))


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A 0/1 keep-mask [B, S] as an additive mask [B, 1, 1, S] (0 keep, very negative drop)."""
    if mask is None:
        return None
    out = (mask.to(dtype) - 1) * torch.finfo(dtype).max
    return out[:, None, None, :] if out.ndim == 2 else out


def adapt_text(adapter: LLMAdapter, text_embeds: torch.Tensor, text_ids: torch.Tensor,
               t5xxl_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Qwen3 states + T5 ids -> DiT context: the adapter, per-token prompt weights, zero-padding to 512."""
    out = adapter(text_embeds, text_ids)
    if t5xxl_weights is not None:
        out = out * t5xxl_weights.to(out)
    return pad_context(out)


def pad_context(context: torch.Tensor, min_length: int = CONTEXT_MIN_LENGTH) -> torch.Tensor:
    """Zero-pad the context rows to at least `min_length` (zero rows are the attention sinks Anima expects)."""
    if context.shape[1] >= min_length:
        return context
    return F.pad(context, (0, 0, 0, min_length - context.shape[1]))
