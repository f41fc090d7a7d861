"""Qwen3 as Anima's text encoder: token ids -> the last layer's hidden states (after the final norm).

Keys follow the Hugging Face / ComfyUI layout (`model.embed_tokens`, `model.layers.N.self_attn.
{q,k,v,o}_proj`, per-head `q_norm`/`k_norm`, SwiGLU `mlp.{gate,up,down}_proj`, `input_layernorm`,
`post_attention_layernorm`, `model.norm`), so `qwen_3_06b_base.safetensors` loads as it is and a
tiny config of the same architecture stands in for it in tests. Causal attention with grouped
KV heads and RoPE (theta 1e6), as Qwen3-0.6B: 28 layers, hidden 1024, 16 query / 8 KV heads of 128.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.cast_linear import CastLinear
from ..checkpoint import CheckpointError, strip_prefix
from ..common.layers import RMSNorm
from ..common.state_dict import count_numbered, load_built_on_meta, load_file_built_on_meta
from .layers import CastEmbedding, apply_rope, cos_sin, rope_angles

STATE_DICT_PREFIXES = ("text_encoders.qwen3_06b.transformer.", "qwen3_06b.transformer.", "transformer.")


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = CastLinear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = CastLinear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = CastLinear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = CastLinear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = CastLinear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = CastLinear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = CastLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, mask):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Body(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = CastEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3Encoder(nn.Module):
    """Token ids [B, S] (+ optional 0/1 attention mask) -> hidden states [B, S, hidden]."""

    def __init__(self, cfg: Qwen3Config = Qwen3Config()):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Body(cfg)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        body = self.model
        dtype = dtype or body.embed_tokens.weight.dtype
        if not dtype.is_floating_point or dtype.itemsize < 2:
            dtype = torch.float32
        x = body.embed_tokens(ids.long(), out_dtype=dtype)
        s = ids.shape[1]
        rope = cos_sin(rope_angles(torch.arange(s, device=x.device), self.config.head_dim, self.config.rope_theta))
        rope = (rope[0].to(dtype), rope[1].to(dtype))
        mask = torch.full((s, s), float("-inf"), device=x.device, dtype=dtype).triu(1)[None, None]
        if attention_mask is not None:
            pad = (1.0 - attention_mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min
            mask = mask + pad
        for layer in body.layers:
            x = layer(x, rope, mask)
        return body.norm(x)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", source: str | None = None) -> Qwen3Encoder:
        """The encoder a checkpoint describes; `source` (the file) is named in errors."""
        sd = _encoder_tensors(sd)
        return load_built_on_meta(cls._factory(sd), sd, _what(source), dtype, device)

    @classmethod
    def from_file(cls, path: str, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> Qwen3Encoder:
        """`from_state_dict` of a checkpoint file, read tensor by tensor into the final dtype."""
        return load_file_built_on_meta(path, _encoder_tensors, cls._factory, _what(path), dtype, device)

    @classmethod
    def _factory(cls, sd: Mapping[str, torch.Tensor]) -> Callable[[], Qwen3Encoder]:
        cfg = qwen3_config_from_state_dict(sd)
        return lambda: cls(cfg)


def _encoder_tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a checkpoint, keyed as the model names them (values untouched)."""
    sd, _ = strip_prefix(sd, STATE_DICT_PREFIXES)
    return {k: v for k, v in sd.items() if k != "lm_head.weight"}   # the encoder stops before the LM head


def _what(source: str | None) -> str:
    return "the Qwen3 text encoder" + (f" in {source}" if source else "")


def qwen3_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> Qwen3Config:
    needed = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_norm.weight",
              "model.layers.0.mlp.gate_proj.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise CheckpointError(
            "This file is not a Qwen3 text encoder: it lacks " + ", ".join(absent[:3]) + ". Anima's text encoder "
            "is qwen_3_06b_base.safetensors in models/text_encoders.")
    vocab, hidden = sd["model.embed_tokens.weight"].shape
    head_dim = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=count_numbered(sd, "model.layers."),
        num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        head_dim=head_dim)
