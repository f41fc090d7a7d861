"""wav2vec 2.0 in plain torch: the speech encoder MultiTalk / InfiniteTalk and FantasyTalking condition on.

The architecture and the module names are those of the Hugging Face `Wav2Vec2Model`, so a checkpoint
loads by its own key names:

    waveform [B, T] -> feature_extractor (7 strided Conv1d, GELU; GroupNorm on the first, or LayerNorm
    on every one in the "layer" variant) -> [B, 512, T/320] -> feature_projection (LayerNorm, Linear)
    -> encoder: + pos_conv_embed (grouped Conv1d, kernel 128, weight-normed), then N transformer layers

The base models the talking-head families use (TencentGameMate/chinese-wav2vec2-base for MultiTalk,
facebook/wav2vec2-base-960h for FantasyTalking) are post-LN (LayerNorm after each residual add, one
LayerNorm before the first layer); the large "layer"-norm models are pre-LN ("stable layer norm",
the final LayerNorm after the last layer). Checkpoints carry no config, so it is read from the
shapes: depth from the layer keys, widths and conv kernels from the weights, heads = width / 64
(as every released wav2vec2 has), strides from the kernels (the first layer's stride is half its
kernel, 10 -> 5; the others 2), pre-LN exactly for the "layer"-norm feature extractor (true of every
released wav2vec2; ComfyUI decides the same way).

The positional convolution is stored weight-normed (`weight_g` / `weight_v`, or
`parametrizations.weight.original0/1` from newer torch); the two are fused into one plain weight on
loading (inference never needs them apart). Norms run in fp32 whatever the compute dtype, like the
other encoders of the house.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import attention
from ...kernels.cast_linear import CastLinear
from ..checkpoint import CheckpointError
from ..common.state_dict import count_numbered
from ..wan.layers import FP32LayerNorm
from ..wan.weights import LoadableEncoder, Recipe, Source

Progress = Callable[[int, int], None]

HEAD_DIM = 64
# Conv-stack frames computed at once for long clips: 1500 frames = 30 s at 16 kHz, ~200 MB of fp32 activations.
CHUNK_FRAMES = 1500


@dataclass(frozen=True)
class Wav2Vec2Config:
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"        # "group": GroupNorm on layer 0; "layer": LayerNorm on every layer
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    do_stable_layer_norm: bool = False      # pre-LN transformer (the large "layer"-norm models)
    masked_spec_embed: bool = True          # the training-time mask vector some files carry (unused here)
    layer_norm_eps: float = 1e-5

    @property
    def hop(self) -> int:
        """Input samples per output frame (320 for the released models: 20 ms at 16 kHz)."""
        hop = 1
        for s in self.conv_stride:
            hop *= s
        return hop

    def num_frames(self, samples: int) -> int:
        """Output frames of the conv stack for `samples` input samples (0 if too short for one)."""
        n = samples
        for k, s in zip(self.conv_kernel, self.conv_stride, strict=True):
            n = (n - k) // s + 1
            if n <= 0:
                return 0
        return n

    @property
    def receptive_field(self) -> int:
        """Input samples one output frame sees (400 for the released models: 25 ms)."""
        field, jump = 1, 1
        for k, s in zip(self.conv_kernel, self.conv_stride, strict=True):
            field += (k - 1) * jump
            jump *= s
        return field


WAV2VEC2_BASE = Wav2Vec2Config()


def stride_for(layer: int, kernel: int) -> int:
    """The conv stride wav2vec2 pairs with a kernel (files store kernels only): 10 -> 5 first, then 2."""
    return max(1, kernel // 2) if layer == 0 else 2


# ---- modules --------------------------------------------------------------------------------------

class ConvLayer(nn.Module):
    """Conv1d -> optional norm -> GELU (HF names: conv, layer_norm)."""

    def __init__(self, cfg: Wav2Vec2Config, i: int):
        super().__init__()
        cin = 1 if i == 0 else cfg.conv_dim[i - 1]
        cout = cfg.conv_dim[i]
        self.conv = nn.Conv1d(cin, cout, cfg.conv_kernel[i], stride=cfg.conv_stride[i], bias=cfg.conv_bias)
        self.norm_kind = cfg.feat_extract_norm if (cfg.feat_extract_norm == "layer" or i == 0) else None
        if self.norm_kind == "group":
            self.layer_norm = nn.GroupNorm(cout, cout, affine=True)   # one group per channel, over time
        elif self.norm_kind == "layer":
            self.layer_norm = nn.LayerNorm(cout, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def normalize(self, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The norm in fp32. GroupNorm spans the whole clip; `stats` (mean, biased var per channel, [B, C])
        lets a caller working through the clip in chunks apply the whole clip's statistics to each chunk."""
        w, b = self.layer_norm.weight.float(), self.layer_norm.bias.float()
        xf = x.float()
        if self.norm_kind == "layer":
            return F.layer_norm(xf.transpose(1, 2), (xf.shape[1],), w, b, self.layer_norm.eps).transpose(1, 2).to(x.dtype)
        if stats is None:
            return F.group_norm(xf, xf.shape[1], w, b, self.layer_norm.eps).to(x.dtype)
        mean, var = (s.float()[..., None] for s in stats)
        y = (xf - mean) * torch.rsqrt(var + self.layer_norm.eps)
        return (y * w[None, :, None] + b[None, :, None]).to(x.dtype)

    def run(self, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """forward() with the clip's GroupNorm statistics given (see `normalize`)."""
        x = self.conv(x)
        if self.norm_kind is not None:
            x = self.normalize(x, stats if self.norm_kind == "group" else None)
        return F.gelu(x)


class FeatureExtractor(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.conv_layers = nn.ModuleList(ConvLayer(cfg, i) for i in range(len(cfg.conv_dim)))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, C, frames]."""
        x = wave[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x

    def chunked(self, wave: torch.Tensor, cfg: Wav2Vec2Config, chunk_frames: int) -> torch.Tensor:
        """forward(), `chunk_frames` output frames at a time: the same result in bounded memory.

        Output frame j sees input samples [hop·j, hop·j + receptive_field), and a chunk starting at a
        multiple of the hop keeps every layer's grid aligned, so chunks of the input with that overlap
        give exactly the full clip's frames. The first layer's GroupNorm is the exception — it
        normalises each channel over the whole clip — so a first pass over that layer alone gathers
        the clip's per-channel mean and variance (float64), which every chunk then uses.
        """
        x = wave[:, None]
        first = self.conv_layers[0]
        stats = None
        if first.norm_kind == "group":
            k0, s0 = cfg.conv_kernel[0], cfg.conv_stride[0]
            n0 = (x.shape[-1] - k0) // s0 + 1
            step = max(1, chunk_frames * cfg.hop // s0)
            total = x.new_zeros(x.shape[0], cfg.conv_dim[0], dtype=torch.float64)
            squares = torch.zeros_like(total)
            for a in range(0, n0, step):
                b = min(n0, a + step)
                y = first.conv(x[..., a * s0:(b - 1) * s0 + k0]).double()
                total += y.sum(-1)
                squares += (y * y).sum(-1)
            mean = total / n0
            stats = (mean, (squares / n0 - mean * mean).clamp_min(0))
        frames = cfg.num_frames(x.shape[-1])
        out = []
        for a in range(0, frames, chunk_frames):
            b = min(frames, a + chunk_frames)
            y = x[..., a * cfg.hop:(b - 1) * cfg.hop + cfg.receptive_field]
            for i, layer in enumerate(self.conv_layers):
                y = layer.run(y, stats if i == 0 else None)
            out.append(y)
        return torch.cat(out, dim=-1)


class FeatureProjection(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = FP32LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = CastLinear(cfg.conv_dim[-1], cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))


class PositionalConvEmbedding(nn.Module):
    """Grouped Conv1d over time with 'same' padding (an even kernel drops its last output), then GELU."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        k = cfg.pos_conv_kernel
        self.conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2, groups=cfg.pos_conv_groups)
        self.trim = 1 if k % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]."""
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[..., : -self.trim]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (CastLinear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.num_heads, d // self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, layout="bshd").reshape(b, s, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dense = CastLinear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = CastLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pre_norm = cfg.do_stable_layer_norm
        self.attention = SelfAttention(cfg)
        self.layer_norm = FP32LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.final_layer_norm = FP32LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention(self.layer_norm(x))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pre_norm = cfg.do_stable_layer_norm
        self.pos_conv_embed = PositionalConvEmbedding(cfg)
        self.layer_norm = FP32LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, callback: Progress | None = None) -> list[torch.Tensor]:
        """Hidden states as HF's output_hidden_states gives them: the input of every layer, then the output
        (post-LN: after the first LayerNorm; pre-LN: the last one after the final LayerNorm)."""
        x = x + self.pos_conv_embed(x)
        if not self.pre_norm:
            x = self.layer_norm(x)
        states = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            states.append(x)
            if callback is not None:
                callback(i + 1, len(self.layers))
        if self.pre_norm:
            states[-1] = self.layer_norm(x)
        return states


# ---- the model ------------------------------------------------------------------------------------

_DROPPED = re.compile(r"^(lm_head\.|quantizer\.|project_q\.|project_hid\.|adapter\.|dropout_features|"
                      r"encoder\.pos_conv_embed\.conv\.(weight_g|weight_v|parametrizations\.))")
_POS = "encoder.pos_conv_embed.conv."
_WEIGHT_NORM_PAIRS = ((_POS + "weight_g", _POS + "weight_v"),
                      (_POS + "parametrizations.weight.original0", _POS + "parametrizations.weight.original1"))


def fuse_weight_norm(parts: list[torch.Tensor]) -> torch.Tensor:
    """weight = g · v / ‖v‖, the norm taken over all axes but the kernel axis (weight_norm(dim=2))."""
    g, v = (p.float() for p in parts)
    return v * (g / v.norm(dim=(0, 1), keepdim=True))


def _recipe(keys: Sequence[str]) -> Recipe:
    """model key <- file key (no prefix): everything but training-only heads; the positional conv fused."""
    recipe: Recipe = {k: Source((k,)) for k in keys if not _DROPPED.match(k)}
    present = set(keys)
    for g, v in _WEIGHT_NORM_PAIRS:
        if g in present and v in present:
            recipe[_POS + "weight"] = Source((g, v), fuse_weight_norm)
            break
    return recipe


_ANCHORS = ("feature_projection.projection.weight",)


class Wav2Vec2(LoadableEncoder):
    """waveform [B, T] (16 kHz, fp32) -> hidden states; `from_file` / `from_state_dict` load HF checkpoints
    (Wav2Vec2Model, Wav2Vec2ForCTC or ForPreTraining files: the `wav2vec2.` prefix and the heads are skipped)."""

    LAYOUTS = {a: _recipe for a in _ANCHORS}
    WHAT = "wav2vec2"
    NOT_FOUND = ("not a wav2vec2 speech encoder: no tensor named like 'feature_projection.projection.weight' "
                 "(with or without a 'wav2vec2.' prefix). Pick a wav2vec2 model such as chinese-wav2vec2-base "
                 "(MultiTalk / InfiniteTalk) or wav2vec2-base-960h (FantasyTalking).")

    def __init__(self, cfg: Wav2Vec2Config = WAV2VEC2_BASE):
        super().__init__()
        self.config = cfg
        if cfg.masked_spec_embed:
            self.masked_spec_embed = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.encoder = Encoder(cfg)

    def extract_features(self, wave: torch.Tensor, chunk_frames: int | None = CHUNK_FRAMES) -> torch.Tensor:
        """[B, T] waveform -> conv features [B, frames, C] (float32).

        Clips longer than `chunk_frames` output frames (default 30 s) go through the conv stack in chunks
        (`FeatureExtractor.chunked`: the same frames), so memory stays bounded for long audio.
        """
        if wave.dim() != 2:
            raise ValueError(f"wav2vec2 expects a waveform [B, T], got shape {tuple(wave.shape)}")
        frames = self.config.num_frames(wave.shape[1])
        if frames == 0:
            raise ValueError(f"audio of {wave.shape[1]} samples is too short for wav2vec2: it needs at least "
                             f"{self.config.receptive_field} samples ({self.config.receptive_field / 16:.0f} ms at 16 kHz).")
        x = wave.to(device=self.device, dtype=self.dtype)
        if chunk_frames is not None and frames > chunk_frames:
            out = self.feature_extractor.chunked(x, self.config, chunk_frames)
        else:
            out = self.feature_extractor(x)
        return out.transpose(1, 2).float()

    def encode_features(self, features: torch.Tensor, callback: Progress | None = None) -> list[torch.Tensor]:
        """conv features [B, L, C] -> every hidden state [B, L, D] (float32): num_layers + 1 of them."""
        x = self.feature_projection(features.to(device=self.device, dtype=self.dtype))
        return [h.float() for h in self.encoder(x, callback=callback)]

    @torch.no_grad()
    def forward(self, wave: torch.Tensor, callback: Progress | None = None) -> list[torch.Tensor]:
        """[B, T] -> hidden states (as `encode_features`); `callback(done, total)` after every layer."""
        return self.encode_features(self.extract_features(wave), callback=callback)

    @staticmethod
    def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], num_heads: int | None = None) -> Wav2Vec2Config:
        """The config for weights of these shapes (model keys, no prefix); see the module docstring."""
        needed = ("feature_extractor.conv_layers.0.conv.weight", "feature_projection.projection.weight",
                  _POS + "weight", "encoder.layers.0.feed_forward.intermediate_dense.weight")
        absent = [k for k in needed if k not in shapes]
        if absent:
            raise CheckpointError(f"Not a wav2vec2 speech encoder: missing tensor(s) {', '.join(absent)}.")
        n_conv = count_numbered(shapes, "feature_extractor.conv_layers.")
        convs = [shapes.get(f"feature_extractor.conv_layers.{i}.conv.weight") for i in range(n_conv)]
        if any(c is None or len(c) != 3 for c in convs):
            raise CheckpointError("wav2vec2: a feature-extractor conv layer is missing or is not a 1-D convolution.")
        hidden = shapes["feature_projection.projection.weight"][0]
        pos = shapes[_POS + "weight"]
        if len(pos) != 3 or pos[1] == 0 or hidden % pos[1]:
            raise CheckpointError(f"wav2vec2: positional conv weight has shape {pos}, not [{hidden}, {hidden}/groups, kernel].")
        layer_norm = "feature_extractor.conv_layers.1.layer_norm.weight" in shapes
        heads = num_heads or max(1, hidden // HEAD_DIM)
        if hidden % heads:
            raise CheckpointError(f"wav2vec2: width {hidden} does not split into {heads} heads; pass num_heads.")
        return Wav2Vec2Config(
            conv_dim=tuple(c[0] for c in convs), conv_kernel=tuple(c[2] for c in convs),
            conv_stride=tuple(stride_for(i, c[2]) for i, c in enumerate(convs)),
            conv_bias="feature_extractor.conv_layers.0.conv.bias" in shapes,
            feat_extract_norm="layer" if layer_norm else "group",
            hidden_size=hidden, num_layers=count_numbered(shapes, "encoder.layers."), num_heads=heads,
            intermediate_size=shapes["encoder.layers.0.feed_forward.intermediate_dense.weight"][0],
            pos_conv_kernel=pos[2], pos_conv_groups=hidden // pos[1], do_stable_layer_norm=layer_norm,
            masked_spec_embed="masked_spec_embed" in shapes)
