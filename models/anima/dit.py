"""The Anima DiT: Cosmos-Predict2 `MiniTrainDIT` as Anima configures it, plus the LLM adapter.

Module and parameter names match ComfyUI's `comfy.ldm.anima.model.Anima` (and the `net.` prefix of
the released file), so the real checkpoint loads here unchanged and a tiny random config of the
same architecture stands in for it in tests. Each block's cross-attention calls `self.attn_op`
with q/k/v already projected and normalised ([B, S, H, D]) — the same seam ComfyUI's Cosmos
attention exposes — which is where per-block reference tokens are injected
(see context_tokens.py).

Forward contract (as ComfyUI's): x [B, 16, T, H, W] latents (normalised with the Wan 2.1
mean/std), timesteps [B] = sigma * multiplier (Anima: multiplier 1.0, so sigma in [0, 1]),
context [B, N, 1024] post-adapter (or raw Qwen3 states plus `t5xxl_ids`, which runs the adapter
first). Returns the rectified-flow velocity, v ≈ noise − x0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import attention
from ...kernels.cast_linear import CastLinear
from ..checkpoint import CheckpointError, strip_prefix
from ..common.layers import RMSNorm, rope_inv_freqs
from ..common.state_dict import count_numbered, load_built_on_meta, load_file_built_on_meta
from .layers import apply_rope, cos_sin
from .llm_adapter import AdapterConfig, LLMAdapter, adapt_text

log = logging.getLogger("slipstream.anima")

STATE_DICT_PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.")
# Non-persistent or training-only tensors some exports carry; they are not part of the model.
_IGNORED_KEY_PREFIXES = ("pos_embedder.", "accum_", "logvar")


@dataclass(frozen=True)
class AnimaConfig:
    """Anima 2B by default; tests build tiny configs of the same architecture."""

    model_channels: int = 2048
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    crossattn_emb_channels: int = 1024
    in_channels: int = 16
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    concat_padding_mask: bool = True
    adaln_lora_dim: int = 256
    rope_h_extrapolation_ratio: float = 4.0
    rope_w_extrapolation_ratio: float = 4.0
    rope_t_extrapolation_ratio: float = 1.0
    adapter: AdapterConfig | None = field(default_factory=AdapterConfig)

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads


def tiny_config(model_channels: int = 64, num_blocks: int = 2, num_heads: int = 4, context_dim: int = 32,
                source_dim: int = 32, adapter_layers: int = 1, adapter_heads: int = 2,
                vocab_size: int = 64) -> AnimaConfig:
    """A few-thousand-parameter Anima with every real module and key name, for tests and demos."""
    return AnimaConfig(model_channels=model_channels, num_blocks=num_blocks, num_heads=num_heads,
                       crossattn_emb_channels=context_dim, adaln_lora_dim=16,
                       adapter=AdapterConfig(source_dim=source_dim, model_dim=context_dim, num_layers=adapter_layers,
                                             num_heads=adapter_heads, vocab_size=vocab_size))


def torch_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       transformer_options: Mapping | None = None, **kwargs) -> torch.Tensor:
    """Default attention: q/k/v [B, S, H, D] -> [B, S, H*D] through the pack's attention kernel."""
    out = attention(q, k, v, layout="bshd")
    return out.reshape(out.shape[0], out.shape[1], -1)


class Attention(nn.Module):
    """Cosmos attention: q/k/v projections, per-head RMSNorm on q and k, RoPE in self-attention only."""

    def __init__(self, query_dim: int, context_dim: int | None, num_heads: int, head_dim: int):
        super().__init__()
        self.is_selfattn = context_dim is None
        context_dim = query_dim if context_dim is None else context_dim
        inner = num_heads * head_dim
        self.n_heads = num_heads
        self.head_dim = head_dim
        self.q_proj = CastLinear(query_dim, inner, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_proj = CastLinear(context_dim, inner, bias=False)
        self.k_norm = RMSNorm(head_dim)
        self.v_proj = CastLinear(context_dim, inner, bias=False)
        self.output_proj = CastLinear(inner, query_dim, bias=False)
        self.attn_op = torch_attention_op

    def compute_qkv(self, x: torch.Tensor, context: torch.Tensor | None,
                    rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        context = x if context is None else context
        b = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(b, -1, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(context).view(b, -1, self.n_heads, self.head_dim))
        v = self.v_proj(context).view(b, -1, self.n_heads, self.head_dim)
        if self.is_selfattn and rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                transformer_options: Mapping | None = None) -> torch.Tensor:
        q, k, v = self.compute_qkv(x, context, rope)
        return self.output_proj(self.attn_op(q, k, v, transformer_options=transformer_options or {}))


def _modulation(dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), CastLinear(dim, lora_dim, bias=False), CastLinear(lora_dim, chunks * dim, bias=False))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift, with shift/scale [B, T, D] broadcast over H and W."""
    normed = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    return normed * (1 + scale[:, :, None, None, :]) + shift[:, :, None, None, :]


class Block(nn.Module):
    """Self-attention, cross-attention, MLP — each with its own AdaLN(-LoRA) shift/scale/gate."""

    def __init__(self, cfg: AnimaConfig):
        super().__init__()
        d = cfg.model_channels
        self.self_attn = Attention(d, None, cfg.num_heads, cfg.head_dim)
        self.cross_attn = Attention(d, cfg.crossattn_emb_channels, cfg.num_heads, cfg.head_dim)
        self.mlp = nn.Module()
        self.mlp.layer1 = CastLinear(d, int(d * cfg.mlp_ratio), bias=False)
        self.mlp.layer2 = CastLinear(int(d * cfg.mlp_ratio), d, bias=False)
        self.adaln_modulation_self_attn = _modulation(d, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = _modulation(d, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = _modulation(d, cfg.adaln_lora_dim, 3)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], adaln_lora: torch.Tensor,
                transformer_options: Mapping | None = None) -> torch.Tensor:
        b, t, h, w, d = x.shape
        shift, scale, gate = (self.adaln_modulation_self_attn(emb) + adaln_lora).chunk(3, dim=-1)
        y = self.self_attn(_modulate(x, shift, scale).reshape(b, -1, d), None, rope, transformer_options)
        x = x + gate[:, :, None, None, :] * y.view(b, t, h, w, d)

        shift, scale, gate = (self.adaln_modulation_cross_attn(emb) + adaln_lora).chunk(3, dim=-1)
        y = self.cross_attn(_modulate(x, shift, scale).reshape(b, -1, d), context, None, transformer_options)
        x = x + gate[:, :, None, None, :] * y.view(b, t, h, w, d)

        shift, scale, gate = (self.adaln_modulation_mlp(emb) + adaln_lora).chunk(3, dim=-1)
        y = self.mlp.layer2(F.gelu(self.mlp.layer1(_modulate(x, shift, scale))))
        return x + gate[:, :, None, None, :] * y


class TimestepEmbedding(nn.Module):
    """AdaLN-LoRA time embedding: the raw sinusoid goes on; linear_1/linear_2 make the shared LoRA term."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = CastLinear(dim, dim, bias=False)
        self.linear_2 = CastLinear(dim, 3 * dim, bias=False)

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sample, self.linear_2(F.silu(self.linear_1(sample)))


class FinalLayer(nn.Module):
    def __init__(self, cfg: AnimaConfig):
        super().__init__()
        d = cfg.model_channels
        self.hidden_size = d
        out = cfg.patch_spatial * cfg.patch_spatial * cfg.patch_temporal * cfg.out_channels
        self.linear = CastLinear(d, out, bias=False)
        self.adaln_modulation = _modulation(d, cfg.adaln_lora_dim, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, adaln_lora: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.adaln_modulation(emb) + adaln_lora[:, :, : 2 * self.hidden_size]).chunk(2, dim=-1)
        return self.linear(_modulate(x, shift, scale))


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, T] timesteps -> [B, T, dim] as cat(cos, sin) with Cosmos' frequency ladder (fp32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[..., None] * freqs
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


class VideoRope3D(nn.Module):
    """Cosmos 3-D RoPE over (t, h, w): the head dim split dim_t | dim_h | dim_w with NTK-scaled bases."""

    def __init__(self, head_dim: int, h_ratio: float, w_ratio: float, t_ratio: float):
        super().__init__()
        self.dim_h = head_dim // 6 * 2
        self.dim_w = self.dim_h
        self.dim_t = head_dim - 2 * self.dim_h
        self.h_theta = 10000.0 * h_ratio ** (self.dim_h / (self.dim_h - 2))
        self.w_theta = 10000.0 * w_ratio ** (self.dim_w / (self.dim_w - 2))
        self.t_theta = 10000.0 * t_ratio ** (self.dim_t / (self.dim_t - 2))

    @staticmethod
    def _freqs(dim: int, theta: float, device) -> torch.Tensor:
        return rope_inv_freqs(dim, theta, device, torch.float32)[: dim // 2]

    def forward(self, t: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [t*h*w, 1, head_dim] for the flattened (t, h, w) grid."""
        ang_t = torch.arange(t, device=device).float()[:, None] * self._freqs(self.dim_t, self.t_theta, device)
        ang_h = torch.arange(h, device=device).float()[:, None] * self._freqs(self.dim_h, self.h_theta, device)
        ang_w = torch.arange(w, device=device).float()[:, None] * self._freqs(self.dim_w, self.w_theta, device)
        grid = torch.cat([
            ang_t[:, None, None, :].expand(t, h, w, -1),
            ang_h[None, :, None, :].expand(t, h, w, -1),
            ang_w[None, None, :, :].expand(t, h, w, -1),
        ], dim=-1).reshape(t * h * w, -1)
        cos, sin = cos_sin(grid)
        return cos[:, None, :], sin[:, None, :]


class PatchEmbed(nn.Module):
    def __init__(self, cfg: AnimaConfig):
        super().__init__()
        self.p = cfg.patch_spatial
        self.pt = cfg.patch_temporal
        channels = cfg.in_channels + (1 if cfg.concat_padding_mask else 0)
        # proj.0 is the (parameter-free) rearrange in the original; the Linear keeps its index 1.
        self.proj = nn.Sequential(nn.Identity(), CastLinear(channels * self.p * self.p * self.pt, cfg.model_channels,
                                                            bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        p, pt = self.p, self.pt
        x = x.view(b, c, t // pt, pt, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t // pt, h // p, w // p, c * pt * p * p)
        return self.proj[1](x)


class AnimaDiT(nn.Module):
    """MiniTrainDIT (AdaLN-LoRA, 3-D RoPE, padding-mask channel) + Anima's LLM adapter."""

    def __init__(self, cfg: AnimaConfig = AnimaConfig()):
        super().__init__()
        self.config = cfg
        d = cfg.model_channels
        self.patch_spatial = cfg.patch_spatial
        self.patch_temporal = cfg.patch_temporal
        self.pos_embedder = VideoRope3D(cfg.head_dim, cfg.rope_h_extrapolation_ratio,
                                        cfg.rope_w_extrapolation_ratio, cfg.rope_t_extrapolation_ratio)
        self.t_embedder = nn.Sequential(nn.Identity(), TimestepEmbedding(d))
        self.x_embedder = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_layer = FinalLayer(cfg)
        self.t_embedding_norm = RMSNorm(d)
        if cfg.adapter is not None:
            self.llm_adapter = LLMAdapter(cfg.adapter)

    # -- text ---------------------------------------------------------------------------------------
    def preprocess_text_embeds(self, text_embeds: torch.Tensor, text_ids: torch.Tensor | None,
                               t5xxl_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Qwen3 states + T5 ids -> the DiT context (adapter, per-token prompt weights, zero-pad to 512)."""
        if text_ids is None:
            return text_embeds
        if not hasattr(self, "llm_adapter"):
            raise CheckpointError("This Anima model has no LLM adapter, so it cannot turn Qwen3 states into context.")
        return adapt_text(self.llm_adapter, text_embeds, text_ids, t5xxl_weights)

    # -- denoiser -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, fps=None, padding_mask=None,
                transformer_options: Mapping | None = None, **kwargs) -> torch.Tensor:
        t5xxl_ids = kwargs.pop("t5xxl_ids", None)
        if t5xxl_ids is not None:
            context = self.preprocess_text_embeds(context, t5xxl_ids, kwargs.pop("t5xxl_weights", None))
        transformer_options = transformer_options if transformer_options is not None else {}
        orig_t, orig_h, orig_w = x.shape[-3:]
        x = _pad_to_patch(x, self.patch_temporal, self.patch_spatial)
        b, _, t, h, w = x.shape
        if self.config.concat_padding_mask:
            x = torch.cat([x, x.new_zeros(b, 1, t, h, w)], dim=1)
        tokens = self.x_embedder(x)                                      # [B, T', H', W', D]
        rope = self.pos_embedder(*tokens.shape[1:4], device=x.device)
        rope = (rope[0].to(tokens.dtype), rope[1].to(tokens.dtype))
        timesteps = timesteps if timesteps.ndim == 2 else timesteps[:, None]
        emb, adaln_lora = self.t_embedder[1](sinusoidal_embedding(timesteps, self.config.model_channels).to(tokens.dtype))
        emb = self.t_embedding_norm(emb)
        context = context.to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, emb, context, rope, adaln_lora, transformer_options)
        out = self.final_layer(tokens, emb, adaln_lora)
        out = self._unpatchify(out)
        return out[:, :, :orig_t, :orig_h, :orig_w]

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, _ = x.shape
        p, pt = self.patch_spatial, self.patch_temporal
        c = x.shape[-1] // (p * p * pt)
        x = x.view(b, t, h, w, p, p, pt, c).permute(0, 7, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, c, t * pt, h * p, w * p)

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", source: str | None = None) -> AnimaDiT:
        """Build the model a checkpoint describes (config read from its shapes) and load it; `source`
        (the file) is named in errors."""
        sd = _model_tensors(sd)
        return load_built_on_meta(cls._factory(sd), sd, _what(source), dtype, device)

    @classmethod
    def from_file(cls, path: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> AnimaDiT:
        """`from_state_dict` of a checkpoint file, read tensor by tensor into the final dtype (the
        file is never held in RAM beside the model)."""
        return load_file_built_on_meta(path, _model_tensors, cls._factory, _what(path), dtype, device)

    @classmethod
    def _factory(cls, sd: Mapping[str, torch.Tensor]) -> Callable[[], AnimaDiT]:
        cfg = config_from_state_dict(sd)
        return lambda: cls(cfg)


def _model_tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DiT's tensors of a checkpoint, keyed as the model names them (values untouched)."""
    sd, _ = strip_prefix(sd, STATE_DICT_PREFIXES)
    ignored = [k for k in sd if k.startswith(_IGNORED_KEY_PREFIXES)]
    if ignored:
        sd = {k: v for k, v in sd.items() if k not in ignored}
        log.info("Anima: ignored %d non-model tensors (%s …)", len(ignored), ignored[0])
    return sd


def _what(source: str | None) -> str:
    return "the Anima DiT (Cosmos-Predict2 MiniTrainDIT + LLM adapter)" + (f" in {source}" if source else "")


def comfy_dit_kwargs(cfg: AnimaConfig) -> dict:
    """The constructor arguments ComfyUI's MiniTrainDIT gets for this config (as its model detection sets them)."""
    return dict(
        max_img_h=240, max_img_w=240, max_frames=128, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        patch_spatial=cfg.patch_spatial, patch_temporal=cfg.patch_temporal, concat_padding_mask=cfg.concat_padding_mask,
        model_channels=cfg.model_channels, num_blocks=cfg.num_blocks, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        crossattn_emb_channels=cfg.crossattn_emb_channels, pos_emb_cls="rope3d", pos_emb_learnable=True,
        pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=cfg.adaln_lora_dim,
        rope_h_extrapolation_ratio=cfg.rope_h_extrapolation_ratio,
        rope_w_extrapolation_ratio=cfg.rope_w_extrapolation_ratio,
        rope_t_extrapolation_ratio=cfg.rope_t_extrapolation_ratio, extra_per_block_abs_pos_emb=False,
        rope_enable_fps_modulation=False)


def _pad_to_patch(x: torch.Tensor, pt: int, p: int) -> torch.Tensor:
    """Circular-pad T, H, W up to the patch grid (as ComfyUI does); the output is cropped back."""
    t, h, w = x.shape[-3:]
    pad = (0, (-w) % p, 0, (-h) % p, 0, (-t) % pt)
    return F.pad(x, pad, mode="circular") if any(pad) else x


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> AnimaConfig:
    """Read an AnimaConfig from tensor shapes (prefix already stripped); explain what is missing."""
    needed = ("x_embedder.proj.1.weight", "blocks.0.cross_attn.k_proj.weight", "blocks.0.mlp.layer1.weight",
              "blocks.0.self_attn.q_norm.weight", "blocks.0.adaln_modulation_self_attn.1.weight",
              "final_layer.linear.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise CheckpointError(
            "This file is not an Anima / Cosmos-Predict2 diffusion model: it lacks " + ", ".join(absent[:3])
            + ". Load the Anima DiT (e.g. anima-preview.safetensors) from models/diffusion_models.")
    d, patch_in = sd["x_embedder.proj.1.weight"].shape
    head_dim = sd["blocks.0.self_attn.q_norm.weight"].shape[0]
    num_blocks = count_numbered(sd, "blocks.")
    p, pt = 2, 1
    in_channels = patch_in // (p * p * pt) - 1
    out_channels = sd["final_layer.linear.weight"].shape[0] // (p * p * pt)
    cfg = AnimaConfig(
        model_channels=d, num_blocks=num_blocks, num_heads=d // head_dim,
        mlp_ratio=sd["blocks.0.mlp.layer1.weight"].shape[0] / d,
        crossattn_emb_channels=sd["blocks.0.cross_attn.k_proj.weight"].shape[1],
        in_channels=in_channels, out_channels=out_channels,
        adaln_lora_dim=sd["blocks.0.adaln_modulation_self_attn.1.weight"].shape[0], adapter=None)
    if "llm_adapter.embed.weight" in sd:
        vocab, model_dim = sd["llm_adapter.embed.weight"].shape
        layers = count_numbered(sd, "llm_adapter.blocks.")
        adapter_head_dim = sd["llm_adapter.blocks.0.self_attn.q_norm.weight"].shape[0]
        cfg = replace(cfg, adapter=AdapterConfig(
            source_dim=sd["llm_adapter.blocks.0.cross_attn.k_proj.weight"].shape[1], model_dim=model_dim,
            num_layers=layers, num_heads=model_dim // adapter_head_dim, vocab_size=vocab,
            mlp_ratio=sd["llm_adapter.blocks.0.mlp.0.weight"].shape[0] / model_dim))
    return cfg
