"""The umT5-XXL text encoder Wan 2.1 conditions on (encoder half of google/umt5-xxl).

What makes it umT5 rather than plain T5: every layer owns its relative position bias (T5 shares
layer 0's), the FFN is gated with tanh-GELU, attention logits are not scaled by 1/sqrt(d), and the
stack ends with an RMS layer norm. Module names follow the official Wan checkpoint
(`blocks.N.attn.q.weight`, ...); HF/ComfyUI files (`encoder.block.N.layer.0.SelfAttention.q.weight`,
`shared.weight`, `spiece_model`) are renamed on load.

Padding convention (official and ComfyUI agree): prompts end with EOS and are padded to the
context length; padded keys are masked in every attention and padded rows of the output are
zero, so the DiT sees exactly the zero-padded context it was trained with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...kernels.attention import attention
from ...kernels.cast_linear import CastLinear
from ..checkpoint import CheckpointError
from ..common.layers import RMSNorm
from ..common.state_dict import count_numbered
from .tokenizer import TokenBatch
from .weights import LoadableEncoder, Recipe, Source, identity_recipe, rename

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class UMT5Config:
    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


UMT5_XXL = UMT5Config()
# Same structure (per-layer bias, gated FFN, 32 buckets), small enough for tests.
TINY_UMT5 = UMT5Config(vocab_size=320, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2)


class T5LayerNorm(RMSNorm):
    """T5's layer norm: an RMS norm (no mean subtraction, no bias) whose result takes the gain's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps, rounding="weight")


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucketing of key-minus-query offsets.

    Half the buckets hold positive offsets. Within a half, offsets below num_buckets/4 get their own
    bucket; larger ones share log-spaced buckets up to `max_distance`, beyond which all share the last.
    """
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    scaled = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)
    large = (exact + scaled.long()).clamp(max=half - 1)
    return buckets + torch.where(distance < exact, distance, large)


class T5RelativeEmbedding(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int, max_distance: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def buckets(self, length: int) -> torch.Tensor:
        """Bucket index [length, length] of every (query, key) pair; the same for every layer."""
        pos = torch.arange(length, device=self.embedding.weight.device)
        return relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """Additive attention bias [1, heads, L, L] for a bucket table."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        # CastLinear: fp8 files can stay fp8 in memory (upcast per layer in forward).
        self.q = CastLinear(dim, dim_attn, bias=False)
        self.k = CastLinear(dim, dim_attn, bias=False)
        self.v = CastLinear(dim, dim_attn, bias=False)
        self.o = CastLinear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, -1) for proj in (self.q, self.k, self.v))
        # T5 does not scale its logits; the additive bias rules out flash kernels, so ask for sdpa.
        y = attention(q, k, v, mask=bias, layout="bshd", scale=1.0, backend="sdpa")
        return self.o(y.reshape(b, n, -1))


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(CastLinear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = CastLinear(dim, dim_ffn, bias=False)
        self.fc2 = CastLinear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # fp16 activations of T5-XXL overflow; the reference clamps them back into range.
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        return x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.max_distance)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        bias = self.pos_embedding(buckets).to(x.dtype)
        if key_mask is not None:
            bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


# HF / ComfyUI names -> official names.
_HF_RENAMES = [
    (re.compile(r"^shared\.weight$"), "token_embedding.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$"), r"blocks.\1.attn.\2.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$"),
     r"blocks.\1.pos_embedding.embedding.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$"), r"blocks.\1.norm1.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$"), r"blocks.\1.norm2.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$"), r"blocks.\1.ffn.gate.0.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$"), r"blocks.\1.ffn.fc1.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$"), r"blocks.\1.ffn.fc2.weight"),
    (re.compile(r"^encoder\.final_layer_norm\.weight$"), "norm.weight"),
]
# Tensors the encoder does not use: a whole-model HF file's decoder and LM head, the tokenizer.
_UNUSED = re.compile(r"^(decoder\.|lm_head\.|spiece_model$)")


def _official_recipe(keys) -> Recipe:
    return identity_recipe(k for k in keys if not _UNUSED.match(k))


def _hf_recipe(keys) -> Recipe:
    keys = set(keys)
    recipe: Recipe = {}
    if "shared.weight" not in keys and "encoder.embed_tokens.weight" in keys:
        recipe["token_embedding.weight"] = Source(("encoder.embed_tokens.weight",))
    for key in sorted(keys):
        if _UNUSED.match(key) or key == "encoder.embed_tokens.weight":  # the latter: a tied copy of shared
            continue
        recipe[rename(key, _HF_RENAMES)] = Source((key,))
    return recipe


_LAYOUTS = {"blocks.0.attn.q.weight": _official_recipe,
            "encoder.block.0.layer.0.SelfAttention.q.weight": _hf_recipe}


class UMT5Encoder(LoadableEncoder):
    """ids [B,L] (+ mask [B,L], True = real token) -> hidden states [B,L,dim], padded rows zero.

    Loads (`from_file`, `from_state_dict`) the official layout, HF/ComfyUI's (`encoder.block...`,
    `shared.weight`) and prefixed all-in-one files.
    """

    LAYOUTS = _LAYOUTS
    WHAT = "the umT5 text encoder"
    NOT_FOUND = ("not a umT5 text encoder: no tensor named like 'blocks.0.attn.q.weight' or "
                 "'encoder.block.0.layer.0.SelfAttention.q.weight'. Pick the umT5-XXL file "
                 "(e.g. umt5_xxl_fp16.safetensors or models_t5_umt5-xxl-enc-bf16.pth).")

    def __init__(self, cfg: UMT5Config = UMT5_XXL):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                callback: Progress | None = None) -> torch.Tensor:
        """`callback(done, total)` runs after every layer (XXL on a CPU takes a while); raising
        from it (an interrupt) stops the encode."""
        if ids.dim() != 2:
            raise ValueError(f"token ids must be [B,L], got {tuple(ids.shape)}")
        if int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"token id out of range 0..{self.config.vocab_size - 1}: the tokenizer does not "
                             "belong to this text encoder")
        ids = ids.to(self.device)
        key_mask = None if mask is None else mask.to(device=self.device, dtype=torch.bool)
        x = self.token_embedding(ids)
        buckets = self.blocks[0].pos_embedding.buckets(ids.shape[1])
        for i, block in enumerate(self.blocks):
            x = block(x, buckets, key_mask)
            if callback is not None:
                callback(i + 1, len(self.blocks))
        x = self.norm(x).float()
        if key_mask is not None:
            x = x * key_mask[..., None]
        return x

    def encode(self, tokens: TokenBatch, callback: Progress | None = None) -> torch.Tensor:
        """Hidden states [B, context, dim] (float32) of a tokenizer batch; padded rows are zero."""
        return self(tokens.ids, tokens.mask, callback=callback)

    # ---- loading -------------------------------------------------------------------------------

    @staticmethod
    def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> UMT5Config:
        """Widths from the weight shapes, layer count from the keys (official names)."""
        needed = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                  "blocks.0.pos_embedding.embedding.weight")
        absent = [k for k in needed if k not in shapes]
        if absent:
            raise CheckpointError(f"Not a umT5 encoder: missing tensor(s) {', '.join(absent)}.")
        vocab, dim = shapes["token_embedding.weight"]
        buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        return UMT5Config(vocab_size=vocab, dim=dim, dim_attn=shapes["blocks.0.attn.q.weight"][0],
                          dim_ffn=shapes["blocks.0.ffn.fc1.weight"][0], num_heads=heads,
                          num_layers=count_numbered(shapes, "blocks."), num_buckets=buckets)
