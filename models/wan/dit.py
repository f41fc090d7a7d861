"""The Wan 2.1 / 2.2 diffusion transformer (T2V, I2V, FLF2V, A14B experts, TI2V-5B), official names.

    model = WanDiT.from_state_dict(sd, dtype=torch.bfloat16, device="cuda")   # or WanDiT.from_file(path)
    v = model(x, timestep, context, clip_fea=None, y=None, denoise_mask=None)   # flow prediction

Shapes: x [B,C,F,H,W] noisy latent (C = 16, or 48 for TI2V-5B; H, W even); timestep [B] in
0..1000; context [B,L,text_dim] umT5 embeddings (zero-padded to 512 tokens here when shorter);
for i2v/flf2v y [B,20,F,H,W] (4 mask + 16 image-latent channels) and, unless the model has no
CLIP branch (Wan 2.2 I2V-A14B), clip_fea [B,257,1280] ([B,514,1280] for FLF2V; plain I2V models
take 514 too, as core does). Returns fp32 [B,C,F,H,W].

Per-token timesteps (Wan 2.2 TI2V): `denoise_mask` [B or 1, 1, F, H, W] (1 = noisy, 0 = a given,
clean latent) makes each token's timestep `timestep · mask` at the token's patch origin, as the
official TI2V pipeline does for the image-conditioned first frame. The time embedding and the
block/head modulation then vary per token (`BlockInputs.e0` [B, L, 6, dim], `e` [B, L, dim]).

Hooking the block loop (block swap, FETA, caching, per-block attention overrides). `forward` is
three stages a caller can also run one by one:

    tokens, inputs = model.embed(x, timestep, context, clip_fea, y)      # non-block modules
    tokens = model.forward_blocks(tokens, inputs, block_runner=None)     # model.blocks[i] in order
    out = model.unembed(tokens, inputs)                                   # head + unpatchify

`model.blocks` is an `nn.ModuleList` named as in the checkpoint (`blocks.N.*`), so a swapper can
walk it and move one block at a time. `block_runner(index, block, tokens, inputs) -> tokens`
(also accepted by `forward`) is called for every block instead of `block(tokens, inputs)`: a
block swapper makes sure block `index` is on the compute device (and prefetches the next) before
calling `block(tokens, inputs)`; a cache may skip blocks. `inputs` (`BlockInputs`) holds what
every block shares: the fp32 modulation `e0`, the projected text (and image) context, the RoPE
tables, the latent grid, the compute dtype, the attention backend, and `self_attn_scale`, an
optional `fn(q, k, grid) -> scale` called in every self-attention with q, k after RoPE
([B, L, heads, head_dim]) whose result multiplies the attention output after `o` — the place the
official Enhance-A-Video (FETA) processor applies its score. Use `dataclasses.replace(inputs, …)`
to change one field for some blocks.

Fun reference adapter (Wan 2.1 Fun V1.1, Wan 2.2 Fun A14B Control: `ref_conv`): `reference`
[B, ref_in_dim, H, W], one latent frame, becomes a frame of tokens in front of the video's; the
RoPE grid (`BlockInputs.grid`) counts it as latent frame 0 and the prediction drops it again.

Speech models (MultiTalk, FantasyTalking) attach with `attach_audio(adapter)` and take their
features through `audio=`; the hooks they use inside the blocks are in models/wan/audio_hooks.py.

Attention goes through `kernels.attention.attention`; the backend is the model's
`attention_backend` (set at load, any name from `backend_choices()`) or the `attention_backend`
argument of `forward`/`embed` for one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...kernels.attention import attention, require_backend
from ...kernels.cast_linear import CastLinear
from ..checkpoint import (
    PICKLE_EXTS,
    check_state_dict,
    load_state_dict,
    read_safetensors_header,
    refuse_non_float,
)
from ..common.loading import (
    allocate_outputs,
    assign_weights,
    plan_dtypes,
    read_safetensors,
    safetensors_dtype,
    split_weight_scales,
)
from .audio_hooks import AudioAdapter, AudioConditioning, BlockAudio, check_conditioning
from .config import WanDiTConfig, detect_config, file_hint, strip_dit_prefix
from .layers import FP32LayerNorm, RMSNorm, apply_rope, rope_cos_sin, sinusoidal_embedding
from .nag import BlockNag

# fn(q, k, grid) -> scale for the self-attention output (see the module docstring).
SelfAttnScale = Callable[[torch.Tensor, torch.Tensor, tuple[int, int, int]], "torch.Tensor | float"]


@dataclass(frozen=True)
class BlockInputs:
    """What every block of one forward shares besides the token stream."""

    e0: torch.Tensor                      # [B, 6, dim] fp32 time modulation, or [B, L, 6, dim] per token
    e: torch.Tensor                       # [B, dim] fp32 time embedding (for the head), or [B, L, dim]
    context: torch.Tensor                 # [B, L_text, dim] projected text context (compute dtype)
    context_img: torch.Tensor | None      # [B, 257 or 514, dim] projected CLIP tokens (i2v/flf2v)
    rope_cos: torch.Tensor                # [1, L, 1, head_dim/2] fp32
    rope_sin: torch.Tensor
    grid: tuple[int, int, int]            # latent frames, rows, columns after patching
    compute_dtype: torch.dtype
    attention_backend: str = "auto"
    self_attn_scale: SelfAttnScale | None = None
    audio: BlockAudio | None = None       # speech-model hooks of this forward (models/wan/audio_hooks.py)
    ref_tokens: int = 0                   # Fun reference tokens in front of the video's (grid counts their frame)
    nag: BlockNag | None = None           # Normalized Attention Guidance of the text cross-attention (models/wan/nag.py)


BlockRunner = Callable[[int, "WanBlock", torch.Tensor, BlockInputs], torch.Tensor]


def run_block(index: int, block: WanBlock, tokens: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    """The default block runner: just run it."""
    return block(tokens, inputs)


def _modulation(n: int, dim: int) -> nn.Parameter:
    """A learned [1, n, dim] AdaLN bias at the official init scale. Not drawn on `meta`: random ops
    there go through torch's reference decompositions, whose first use imports ~800 modules (2 s)."""
    param = nn.Parameter(torch.empty(1, n, dim))
    if param.device.type != "meta":
        nn.init.normal_(param, std=dim ** -0.5)
    return param


def modulation_terms(bias: nn.Parameter, e: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The AdaLN terms of a learned [1, n, dim] bias plus the time modulation, each broadcastable
    over [B, L, dim] tokens: e [B, n, dim] gives [B, 1, dim] terms, per-token e [B, L, n, dim] [B, L, dim]."""
    if e.dim() == 4:
        return (bias.float().unsqueeze(0) + e).unbind(2)
    return (bias.float() + e).chunk(bias.shape[1], dim=1)


def _mlp(dims: tuple[int, int, int], act: nn.Module) -> nn.Sequential:
    return nn.Sequential(CastLinear(dims[0], dims[1]), act, CastLinear(dims[1], dims[2]))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """[B, Lq, H, D] attention over [B, Lk, H, D] keys -> [B, Lq, H·D]."""
    return attention(q, k, v, backend=backend, layout="bshd").flatten(2)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (CastLinear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), inputs.rope_cos, inputs.rope_sin)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), inputs.rope_cos, inputs.rope_sin)
        v = self.v(x).unflatten(-1, heads)
        if inputs.audio is not None:
            inputs.audio.self_attention(self, q, k, inputs)
        out = self.o(_attend(q, k, v, inputs.attention_backend))
        if inputs.self_attn_scale is not None:
            out = out * inputs.self_attn_scale(q, k, inputs.grid)
        return out


class WanCrossAttention(nn.Module):
    """Text cross-attention; with `image=True` also the CLIP branch (k_img/v_img) sharing the same q."""

    def __init__(self, dim: int, num_heads: int, eps: float, image: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (CastLinear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        if image:
            self.k_img = CastLinear(dim, dim)
            self.v_img = CastLinear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        heads = (self.num_heads, -1)
        ctx = inputs.context
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(ctx)).unflatten(-1, heads)
        out = _attend(q, k, self.v(ctx).unflatten(-1, heads), inputs.attention_backend)
        if inputs.nag is not None:
            out = inputs.nag.guide(self, q, out, inputs.attention_backend)
        if hasattr(self, "k_img"):
            img = inputs.context_img
            k_img = self.norm_k_img(self.k_img(img)).unflatten(-1, heads)
            out = out + _attend(q, k_img, self.v_img(img).unflatten(-1, heads), inputs.attention_backend)
        if inputs.audio is not None:
            extra = inputs.audio.cross_attention(self, q, inputs)
            if extra is not None:
                out = out + extra
        return self.o(out)


class WanBlock(nn.Module):
    """AdaLN-modulated self-attention, un-modulated cross-attention, modulated tanh-GELU FFN."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, config.num_heads, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, config.num_heads, eps, image=config.has_clip)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = _mlp((dim, config.ffn_dim, dim), nn.GELU(approximate="tanh"))
        self.modulation = _modulation(6, dim)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """x: [B, L, dim] fp32 residual stream."""
        cd = inputs.compute_dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = modulation_terms(self.modulation, inputs.e0)
        y = self.self_attn((self.norm1(x) * (1 + scale_sa) + shift_sa).to(cd), inputs)
        x = x + y.float() * gate_sa
        x = x + self.cross_attn(self.norm3(x).to(cd), inputs).float()
        if inputs.audio is not None:
            extra = inputs.audio.after_cross_attention(self, x, inputs)
            if extra is not None:
                x = x + extra.float()
        y = self.ffn((self.norm2(x) * (1 + scale_ff) + shift_ff).to(cd))
        return x + y.float() * gate_ff


class WanHead(nn.Module):
    def __init__(self, config: WanDiTConfig):
        super().__init__()
        dim = config.dim
        self.norm = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.head = CastLinear(dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = _modulation(2, dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        shift, scale = modulation_terms(self.modulation, e.unsqueeze(-2))
        return self.head((self.norm(x) * (1 + scale) + shift).to(compute_dtype))


class WanImageEmbedding(nn.Module):
    """CLIP tokens -> model width: LayerNorm, Linear, GELU (erf), Linear, LayerNorm (+ emb_pos for flf2v)."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        c, dim = config.clip_dim, config.dim
        self.proj = nn.Sequential(FP32LayerNorm(c, 1e-5), CastLinear(c, c), nn.GELU(), CastLinear(c, dim),
                                  FP32LayerNorm(dim, 1e-5))
        if config.model_type == "flf2v":
            self.emb_pos = nn.Parameter(torch.zeros(1, config.clip_tokens, c))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "emb_pos"):  # the two images' tokens as one sequence, each with its position
            clip_fea = clip_fea.reshape(-1, self.emb_pos.shape[1], clip_fea.shape[-1]) + self.emb_pos.to(clip_fea.dtype)
        return self.proj(clip_fea)


def _scaled_weights(scales: Mapping[str, object]) -> list[str]:
    return [layer + ".weight" for layer in scales]


def _scale_key(entries: Mapping[str, object], layer: str) -> str:
    """The file's own name for a layer's weight scale (it uses one of two suffixes)."""
    return next(k for k in (layer + ".scale_weight", layer + ".weight_scale") if k in entries)


class WanDiT(nn.Module):
    """Wan 2.1 / 2.2 DiT. Build with `from_state_dict`/`from_file`; see the module docstring for the API."""

    def __init__(self, config: WanDiTConfig, attention_backend: str = "auto"):
        super().__init__()
        self.config = config
        require_backend(attention_backend)
        self.attention_backend = attention_backend
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = _mlp((config.text_dim, dim, dim), nn.GELU(approximate="tanh"))
        self.time_embedding = _mlp((config.freq_dim, dim, dim), nn.SiLU())
        self.time_projection = nn.Sequential(nn.SiLU(), CastLinear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = WanHead(config)
        if config.has_clip:
            self.img_emb = WanImageEmbedding(config)
        if config.has_ref_conv:      # Fun reference adapter: one latent frame -> one frame of tokens
            self.ref_conv = nn.Conv2d(config.ref_in_dim, dim, kernel_size=config.patch_size[1:],
                                      stride=config.patch_size[1:])
        self.audio_adapter: AudioAdapter | None = None

    def attach_audio(self, adapter: AudioAdapter) -> None:
        """Attach a speech model (MultiTalk, FantasyTalking): its per-block modules join the blocks,
        its projector becomes `self.audio_adapter`; a second speech model is refused."""
        if self.audio_adapter is not None:
            raise ValueError(f"this Wan model already carries a {self.audio_adapter.family} model; load the "
                             "model again to attach another speech model.")
        adapter.attach(self)
        self.audio_adapter = adapter

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def build_meta(cls, config: WanDiTConfig, attention_backend: str = "auto") -> WanDiT:
        """The module tree with no memory behind it (every tensor on `meta`)."""
        with torch.device("meta"):
            return (model_class(config) if cls is WanDiT else cls)(config, attention_backend)

    @staticmethod
    def expected_shapes(config: WanDiTConfig) -> dict[str, tuple[int, ...]]:
        """Official key -> shape of every tensor a checkpoint of `config` holds."""
        return {k: tuple(v.shape) for k, v in WanDiT.build_meta(config).state_dict().items()}

    def use_fp8_matmul(self) -> int:
        """Turn on fp8 × fp8 matmul in every block Linear stored in scaled fp8; how many took it."""
        return sum(mod.use_fp8_matmul() for name, mod in self.named_modules()
                   if name.startswith("blocks.") and isinstance(mod, CastLinear))

    def quantizable_keys(self) -> list[str]:
        """Keys of the block Linear weights: what fp8/int8 storage applies to (norms, biases,
        modulation, embeddings and head stay in the compute dtype, as in kijai's and ComfyUI's loaders)."""
        return [f"{name}.weight" for name, mod in self.named_modules()
                if name.startswith("blocks.") and isinstance(mod, CastLinear)]

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, *, weight_dtype: torch.dtype | None = None,
                        metadata: Mapping[str, str] | None = None, num_heads: int | None = None,
                        attention_backend: str = "auto", what: str = "state dict") -> WanDiT:
        """Build the DiT a state dict describes (official, ComfyUI-prefixed or scaled-fp8 keys).

        `dtype`: compute dtype and storage of everything but the block Linear weights (default: the
        file's, bf16 for fp8 files). `weight_dtype`: storage of the block Linear weights, e.g.
        torch.float8_e4m3fn (default: fp8 files stay fp8, else `dtype`). Tensors already in the
        target dtype and device are adopted, not copied. Raises CheckpointError naming any
        missing, unexpected or wrongly shaped tensor.
        """
        entries, _ = strip_dit_prefix(sd, what)
        weights, scales = split_weight_scales(entries)
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        stored = {k: v.dtype for k, v in weights.items()}
        model, plan = cls._prepare(shapes, stored, dtype, weight_dtype, metadata, num_heads, attention_backend, what,
                                   file_hint(sd, metadata, what))
        outputs = allocate_outputs(shapes, stored, plan, device, _scaled_weights(scales), adopt_unchanged=True)
        return assign_weights(model, ((k, weights[k]) for k in shapes), plan, device, scales, outputs=outputs)

    @classmethod
    def from_file(cls, path: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  *, weight_dtype: torch.dtype | None = None, num_heads: int | None = None,
                  attention_backend: str = "auto") -> WanDiT:
        """Load a checkpoint file; safetensors are checked from the header, then every output is
        allocated and filled tensor by tensor, so peak RAM stays near the size of the loaded weights."""
        if path.lower().endswith(PICKLE_EXTS):
            return cls.from_state_dict(load_state_dict(path), dtype, device, weight_dtype=weight_dtype,
                                       num_heads=num_heads, attention_backend=attention_backend, what=path)
        header, metadata = read_safetensors_header(path)
        entries, prefix = strip_dit_prefix(header, path)
        weights, scales = split_weight_scales(entries)
        shapes = {k: tuple(v["shape"]) for k, v in weights.items()}
        stored = {k: safetensors_dtype(path, k, v["dtype"]) for k, v in weights.items()}
        model, plan = cls._prepare(shapes, stored, dtype, weight_dtype, metadata, num_heads, attention_backend, path,
                                   file_hint(header, metadata, path))
        scale_tensors = {layer: t for layer, (_, t) in zip(
            scales, read_safetensors(path, [prefix + _scale_key(entries, layer) for layer in scales]), strict=True)}
        outputs = allocate_outputs(shapes, stored, plan, device, _scaled_weights(scales))
        direct = {prefix + k: out for k, out in outputs.items()
                  if out.dtype == stored[k] and out.device.type == "cpu"}   # read straight into place
        tensors = ((k[len(prefix):], t) for k, t in read_safetensors(
            path, [prefix + k for k in shapes], lambda key, dtype: True, out=direct))
        return assign_weights(model, tensors, plan, device, scale_tensors, outputs=outputs)

    @classmethod
    def _prepare(cls, shapes, dtypes, dtype, weight_dtype, metadata, num_heads, attention_backend, what, hint):
        """Detect the config, build on meta, check every key and shape, plan the dtypes."""
        config = detect_config(shapes, metadata, num_heads, what, hint=hint)
        model = cls.build_meta(config, attention_backend)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_state_dict(expected, {k: torch.empty(s, device="meta") for k, s in shapes.items()},
                         f"the {config.name} Wan {config.generation} DiT ({what})")
        refuse_non_float({k: v.dtype for k, v in model.state_dict().items()}, dtypes, what)
        plan = plan_dtypes(dtype, weight_dtype, dtypes["blocks.0.self_attn.q.weight"], model.quantizable_keys())
        return model, plan

    # ----------------------------------------------------------------------------------- properties
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in: that of the (never fp8) text-embedding weights."""
        return self.text_embedding[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
                block_runner: BlockRunner | None = None, attention_backend: str | None = None,
                self_attn_scale: SelfAttnScale | None = None,
                denoise_mask: torch.Tensor | None = None, audio: AudioConditioning | None = None,
                reference: torch.Tensor | None = None) -> torch.Tensor:
        """Flow prediction [B, out_dim, F, H, W] (fp32) for the noisy latent x; see the module docstring."""
        tokens, inputs = self.embed(x, timestep, context, clip_fea, y, attention_backend=attention_backend,
                                    self_attn_scale=self_attn_scale, denoise_mask=denoise_mask, audio=audio,
                                    reference=reference)
        tokens = self.forward_blocks(tokens, inputs, block_runner)
        return self.unembed(tokens, inputs)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
              clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
              attention_backend: str | None = None, self_attn_scale: SelfAttnScale | None = None,
              denoise_mask: torch.Tensor | None = None, audio: AudioConditioning | None = None,
              reference: torch.Tensor | None = None) -> tuple[torch.Tensor, BlockInputs]:
        """Patchify and embed everything the blocks need: (fp32 tokens [B, L, dim], BlockInputs)."""
        cfg, cd = self.config, self.compute_dtype
        self._check_inputs(x, timestep, context, clip_fea, y)
        _check_denoise_mask(denoise_mask, x)
        self._check_reference(reference, x, denoise_mask)
        check_conditioning(self.audio_adapter, audio, f"the {cfg.name} Wan DiT")
        device = x.device
        if cfg.has_image_input:
            x = torch.cat([x, y.to(device=device, dtype=x.dtype)], dim=1)
        patches = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        grid = tuple(patches.shape[2:])
        tokens = patches.flatten(2).transpose(1, 2).float()          # (f, h, w) row-major order
        ref_tokens = 0
        if reference is not None:    # Fun: the reference frame's tokens go first, as latent frame 0 of the RoPE grid
            ref = self.ref_conv(reference.to(device=device, dtype=self.ref_conv.weight.dtype))
            ref = ref.flatten(2).transpose(1, 2).float()
            ref_tokens, grid = ref.shape[1], (grid[0] + 1, grid[1], grid[2])
            tokens = torch.cat([ref, tokens], dim=1)

        t = timestep.to(device).reshape(-1).expand(x.shape[0]) if timestep.numel() == 1 else timestep.to(device)
        if denoise_mask is not None:
            t = token_timesteps(t, denoise_mask.to(device), cfg.patch_size)       # [B, L]
        # Each distinct timestep is embedded once (per token, few values: a clean frame and the rest).
        values, where = torch.unique(t, return_inverse=True)
        e = self.time_embedding(sinusoidal_embedding(values, cfg.freq_dim).to(cd)).float()
        e0 = self.time_projection(e.to(cd)).float().unflatten(1, (6, cfg.dim))
        e, e0 = e[where], e0[where]                                   # [B(, L), dim], [B(, L), 6, dim]

        context = context.to(device=device, dtype=cd)
        if context.shape[1] < cfg.text_len:
            context = torch.cat([context, context.new_zeros(context.shape[0], cfg.text_len - context.shape[1],
                                                            context.shape[2])], dim=1)
        context = self.text_embedding(context)
        context_img = self.img_emb(clip_fea.to(device=device, dtype=cd)) if cfg.has_clip else None

        cos, sin = rope_cos_sin(grid, cfg.rope_axes, device)
        block_audio = None if audio is None else self.audio_adapter.prepare(
            audio, batch=x.shape[0], grid=grid, device=device, dtype=cd)
        inputs = BlockInputs(e0=e0, e=e, context=context, context_img=context_img, rope_cos=cos, rope_sin=sin,
                             grid=grid, compute_dtype=cd,
                             attention_backend=attention_backend or self.attention_backend,
                             self_attn_scale=self_attn_scale, audio=block_audio, ref_tokens=ref_tokens)
        return tokens, inputs

    def forward_blocks(self, tokens: torch.Tensor, inputs: BlockInputs,
                       block_runner: BlockRunner | None = None) -> torch.Tensor:
        """Run every block in order through `block_runner` (default: call the block)."""
        runner = block_runner or run_block
        for index, block in enumerate(self.blocks):
            tokens = runner(index, block, tokens, inputs)
        return tokens

    def unembed(self, tokens: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """Head + unpatchify: fp32 [B, out_dim, F·pt, H·ph, W·pw]."""
        out = self.head(tokens, inputs.e, inputs.compute_dtype).float()
        (f, h, w), (pt, ph, pw) = inputs.grid, self.config.patch_size
        if inputs.ref_tokens:        # the Fun reference frame is cut off the prediction
            out, f = out[:, inputs.ref_tokens:], f - 1
        out = out.view(out.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(out.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)

    def _check_reference(self, reference, x, denoise_mask) -> None:
        if reference is None:
            return
        cfg = self.config
        if not cfg.has_ref_conv:
            raise ValueError(f"{cfg.name} has no reference-image adapter ('ref_conv'); only Wan 2.1 Fun V1.1 and "
                             "Wan 2.2 Fun Control models take a reference image.")
        want = (x.shape[0], cfg.ref_in_dim, x.shape[3], x.shape[4])
        if reference.dim() != 4 or tuple(reference.shape) != want:
            raise ValueError(f"reference must be one latent frame [B, {cfg.ref_in_dim}, H, W] = {want}, got "
                             f"{tuple(reference.shape)}")
        if denoise_mask is not None:
            raise ValueError("a Fun reference frame cannot be combined with per-token timesteps (denoise_mask).")

    def _check_inputs(self, x, timestep, context, clip_fea, y) -> None:
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.out_dim:
            raise ValueError(f"x must be a latent [B, {cfg.out_dim}, F, H, W], got {tuple(x.shape)}")
        b, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent frames/height/width {f}x{h}x{w} must be multiples of the patch size "
                             f"{cfg.patch_size} (pixel height and width multiples of {8 * ph})")
        if timestep.numel() not in (1, b):
            raise ValueError(f"timestep must have 1 or B={b} values, got shape {tuple(timestep.shape)}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B={b}, L, {cfg.text_dim}] text embeddings, got {tuple(context.shape)}")
        if not cfg.has_image_input:
            return
        if y is None or (cfg.has_clip and clip_fea is None):
            clip = f"clip_fea [B, {cfg.clip_tokens}, {cfg.clip_dim}] (CLIP vision) and " if cfg.has_clip else ""
            raise ValueError(f"{cfg.name} is an image-to-video model: it needs {clip}y [B, {cfg.cond_channels}, F, H, "
                             "W] (mask + image latent).")
        if tuple(y.shape) != (b, cfg.cond_channels, f, h, w):
            raise ValueError(f"y must be [B, {cfg.cond_channels}, F, H, W] = {(b, cfg.cond_channels, f, h, w)}, "
                             f"got {tuple(y.shape)}")
        if not cfg.has_clip:
            return
        # flf2v also takes the two images' features as [2B, 257, clip_dim] (the official layout); a plain
        # i2v model takes one image's 257 tokens or a start and an end image's 514 (core's first/last frame).
        tokens = (cfg.clip_tokens,) if cfg.model_type == "flf2v" else (cfg.clip_tokens, 2 * cfg.clip_tokens)
        if clip_fea.dim() != 3 or clip_fea.shape[-1] != cfg.clip_dim or \
                clip_fea.shape[0] * clip_fea.shape[1] not in tuple(b * n for n in tokens):
            raise ValueError(f"clip_fea must be [B={b}, {' or '.join(map(str, tokens))}, {cfg.clip_dim}] CLIP vision "
                             f"features, got {tuple(clip_fea.shape)}")


def token_timesteps(timestep: torch.Tensor, denoise_mask: torch.Tensor,
                    patch_size: tuple[int, int, int]) -> torch.Tensor:
    """[B] timesteps and a [B or 1, C, F, H, W] latent mask -> [B, L] per-token timesteps: each token's
    timestep times the mask at its patch's first latent element (official TI2V: `mask[:, ::2, ::2] · t`)."""
    pt, ph, pw = patch_size
    dtype = timestep.dtype if timestep.is_floating_point() else torch.float32
    mask = denoise_mask[:, 0, ::pt, ::ph, ::pw].flatten(1).to(dtype)        # (f, h, w) row-major, like the tokens
    return timestep.to(dtype).reshape(-1, 1) * mask


def _check_denoise_mask(mask: torch.Tensor | None, x: torch.Tensor) -> None:
    if mask is None:
        return
    if mask.dim() != 5 or mask.shape[0] not in (1, x.shape[0]) or tuple(mask.shape[2:]) != tuple(x.shape[2:]):
        raise ValueError(f"denoise_mask must be [B or 1, 1, F, H, W] = [.., 1, {', '.join(map(str, x.shape[2:]))}] "
                         f"(1 = noisy, 0 = a given clean latent), got {tuple(mask.shape)}")


def model_class(config: WanDiTConfig) -> type[WanDiT]:
    """The module a config needs: WanDiT, or its VACE subclass (models/wan/vace.py) for VACE files."""
    if config.is_vace:
        from .vace import WanVaceDiT  # imported here: vace.py builds on this module
        return WanVaceDiT
    return WanDiT


def random_state_dict(config: WanDiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under the official names for tests and demos: the official init scales,
    with norm weights and the flf2v position embedding perturbed so that no tensor is trivial."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sd = model_class(config)(config).state_dict()
        for key, value in sd.items():
            if key.endswith(("norm_q.weight", "norm_k.weight", "norm_k_img.weight", "norm3.weight")) or \
                    key.startswith("img_emb.proj.") and value.dim() == 1:
                value.add_(0.1 * torch.randn_like(value))
            elif key == "img_emb.emb_pos":
                value.normal_(0.0, 0.02)
    return {k: v.to(dtype) for k, v in sd.items()}
