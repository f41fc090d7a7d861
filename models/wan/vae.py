"""The Wan 2.1 causal 3D VAE (video <-> 16-channel latent, 4x in time, 8x in space).

Every temporal convolution is causal: it pads only on the past side, so the video can be encoded
in chunks of 1, 4, 4, ... frames and decoded one latent frame at a time while a small per-layer
`FrameCache` carries the last two input frames of each convolution into the next chunk. This keeps
memory independent of the frame count and reproduces exactly what the official model computes
(including its two quirks: the first chunk skips the temporal down/upsampling, which is why
`1 + 4k` frames map to `1 + k` latents).

Latents cross module boundaries *raw* (ComfyUI's convention); `normalize_latent` /
`denormalize_latent` (latents.py) apply the per-channel statistics the DiT was trained on.
The Wan 2.2 VAE (vae22.py) is built from this module's layers.

Module names equal the official checkpoint's keys (`encoder.downsamples.3.residual.2.weight`, ...)
so files load without renaming.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import attention
from ..checkpoint import CheckpointError
from .latents import WAN21_MEAN, WAN21_STD, denormalize_latent, normalize_latent
from .tiling import Tiling, run_tiled
from .weights import LoadableEncoder, identity_recipe

Progress = Callable[[int, int], None]

CACHE_FRAMES = 2  # a temporal kernel of 3 needs the 2 frames before the chunk
TEMPORAL_FACTOR = 4
SPATIAL_FACTOR = 8

# Per-channel statistics of the raw latent (see latents.py; re-exported for callers of this module).
LATENT_MEAN, LATENT_STD = WAN21_MEAN, WAN21_STD


def latent_frames(pixel_frames: int) -> int:
    """Latent frames for a valid pixel frame count (1 + 4k -> 1 + k)."""
    return 1 + (pixel_frames - 1) // TEMPORAL_FACTOR


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames the decoder produces for a latent frame count (1 + k -> 1 + 4k)."""
    return 1 + TEMPORAL_FACTOR * (latent_frames - 1)


@dataclass(frozen=True)
class WanVAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temporal_downsample))


WAN21_VAE = WanVAEConfig()
# Same structure (every block type, both temporal resamplers, the attention block), 1/12 the width.
TINY_VAE = WanVAEConfig(dim=8)


class FrameCache:
    """What each causal layer remembers from the previous chunk: its last input frames, or
    `FIRST_CHUNK_SEEN` for an upsampler that has passed its first (not time-doubled) frame."""

    FIRST_CHUNK_SEEN = object()

    def __init__(self):
        self._state: dict[int, object] = {}

    def get(self, layer: nn.Module):
        return self._state.get(id(layer))

    def put(self, layer: nn.Module, value) -> None:
        self._state[id(layer)] = value


def _tail_frames(x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """The last CACHE_FRAMES frames of the stream so far (this chunk, topped up from the previous)."""
    tail = x[:, :, -CACHE_FRAMES:]
    if tail.shape[2] < CACHE_FRAMES and previous is not None:
        tail = torch.cat([previous[:, :, -1:].to(tail), tail], dim=2)
    return tail.clone()


class CausalLayer(nn.Module):
    """Marker base: the layer's forward takes (x, cache)."""


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding sits entirely before the first frame (frame t never sees t+1).

    Spatial padding is symmetric. With a cache, the previous chunk's last frames replace the zero
    padding, which makes chunked processing equal to processing the whole clip at once.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.past_frames = 2 * pt
        self.spatial_pad = (pw, pw, ph, ph)

    def run(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution with `past` frames standing in for (part of) the causal padding."""
        pad_t = self.past_frames
        if past is not None and pad_t > 0:
            x = torch.cat([past.to(x), x], dim=2)
            pad_t -= past.shape[2]
        if pad_t or any(self.spatial_pad):
            x = F.pad(x, (*self.spatial_pad, pad_t, 0))
        return super().forward(x)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        if cache is None or self.past_frames == 0:
            return self.run(x)
        past = cache.get(self)
        cache.put(self, _tail_frames(x, past))
        return self.run(x, past)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned gain (`gamma`, no bias)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _run_layers(layers: nn.Sequential, x: torch.Tensor, cache: FrameCache | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalLayer, CausalConv3d)) else layer(x)
    return x


class ResidualBlock(CausalLayer):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Index 5 is the (inactive) dropout of the original; kept so the keys stay residual.6.*.
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        return self.shortcut(x) + _run_layers(self.residual, x, cache)


class AttentionBlock(CausalLayer):
    """Single-head self-attention over the pixels of each frame (frames do not attend to each other)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        # One head as wide as the block (up to 384): beyond flash kernels' head size, so sdpa.
        y = attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="sdpa")
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nearest-exact in float: bf16 is not implemented for it on every backend.
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Resample(CausalLayer):
    """2x spatial down/upsampling, plus 2x temporal for the 3d modes (skipped on the first chunk)."""

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, halve_on_upsample: bool = True):
        """`halve_on_upsample`: the Wan 2.1 upsampler's conv halves the width; Wan 2.2's keeps it."""
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2 if halve_on_upsample else dim, 3,
                                                                  padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, self._need_cache(cache))
        x = self._per_frame(x)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, self._need_cache(cache))
        return x

    def _need_cache(self, cache: FrameCache | None) -> FrameCache:
        if cache is None:
            raise ValueError("temporal resampling runs chunk by chunk: pass a FrameCache "
                             "(use WanVAE.encode/decode rather than calling the encoder directly)")
        return cache

    def _per_frame(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)

    def _double_frames(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        state = cache.get(self)
        if state is None:  # first latent frame decodes to one frame: no temporal upsampling
            cache.put(self, FrameCache.FIRST_CHUNK_SEEN)
            return x
        first_time = state is FrameCache.FIRST_CHUNK_SEEN
        tail = x[:, :, -CACHE_FRAMES:]
        if tail.shape[2] < CACHE_FRAMES:
            filler = torch.zeros_like(tail[:, :, -1:]) if first_time else state[:, :, -1:].to(tail)
            tail = torch.cat([filler, tail], dim=2)
        # The official model pads the first doubling with zeros, not with the cached frame.
        y = self.time_conv.run(x, None if first_time else state)
        cache.put(self, tail.clone())
        b, c2, t, h, w = y.shape
        return y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)

    def _halve_frames(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        previous = cache.get(self)
        cache.put(self, x[:, :, -1:].clone())
        if previous is None:  # the first chunk (one frame) stays one frame
            return x
        return self.time_conv.run(torch.cat([previous.to(x), x], dim=2))


def middle_stack(width: int) -> nn.Sequential:
    """The bottleneck both towers share: residual block, per-frame attention, residual block."""
    return nn.Sequential(ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width))


def output_head(width: int, out_channels: int) -> nn.Sequential:
    """Norm, SiLU and a causal 3x3x3 conv: the last layers of either tower."""
    return nn.Sequential(RMSNorm(width), nn.SiLU(), CausalConv3d(width, out_channels, 3, padding=1))


def _widths(cfg: WanVAEConfig) -> list[int]:
    return [cfg.dim * m for m in (1, *cfg.dim_mult)]


class Encoder3d(CausalLayer):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = _widths(cfg)
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = middle_stack(dims[-1])
        self.head = output_head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.downsamples, self.middle, self.head):
            x = _run_layers(part, x, cache)
        return x


class Decoder3d(CausalLayer):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = middle_stack(dims[0])
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
            if i > 0:  # the previous upsampler halved the channels
                in_dim //= 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if cfg.temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = output_head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.middle, self.upsamples, self.head):
            x = _run_layers(part, x, cache)
        return x


# Anchor keys that locate the VAE inside a file, whatever the prefix ('', 'vae.', 'model.', ...).
_ANCHORS = ("decoder.middle.0.residual.0.gamma",)


class WanVAE(LoadableEncoder):
    """The Wan 2.1 VAE. `encode` takes [B,3,F,H,W] in -1..1 (F = 1+4k, H and W multiples of 8) and
    returns the raw latent [B,16,1+k,H/8,W/8] (float32); `decode` inverts it (clamped to -1..1).

    Loads (`from_file`, `from_state_dict`) the official layout and prefixed ones: ComfyUI's
    all-in-one `vae.`, kijai's `model.`.
    """

    LAYOUTS = {anchor: identity_recipe for anchor in _ANCHORS}
    GENERATION = "2.1"
    SPATIAL = SPATIAL_FACTOR              # pixels per latent element, rows and columns
    LATENT_CHANNELS = len(LATENT_MEAN)
    WHAT = "the Wan 2.1 VAE"
    NOT_FOUND = ("not a Wan 2.1 VAE: no tensor named like 'decoder.middle.0.residual.0.gamma' (with or without a "
                 "prefix). Pick the Wan 2.1 VAE file (e.g. wan_2.1_vae.safetensors).")

    def __init__(self, cfg: WanVAEConfig = WAN21_VAE):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    # ---- loading -------------------------------------------------------------------------------

    @staticmethod
    def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> WanVAEConfig:
        """The config of VAE weights (official names): width from `encoder.conv1`, latent channels from `conv2`."""
        for key in ("encoder.conv1.weight", "conv2.weight"):
            if key not in shapes:
                raise CheckpointError(f"Not a Wan 2.1 VAE: missing tensor {key}.")
        z_dim = shapes["conv2.weight"][0]
        if z_dim != len(LATENT_MEAN):
            raise CheckpointError(
                f"This VAE has {z_dim} latent channels; the Wan 2.1 VAE has {len(LATENT_MEAN)}. "
                "(48 channels is the Wan 2.2 VAE: load it with vae22.load_wan_vae / Wan22VAE.)")
        return WanVAEConfig(dim=shapes["encoder.conv1.weight"][0], z_dim=z_dim)

    # ---- encode / decode -----------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, callback: Progress | None = None,
               tiling: Tiling | None = None) -> torch.Tensor:
        """[B,3,1+4k,H,W] in -1..1 -> raw latent [B,16,1+k,H/8,W/8] (float32).

        `callback(done, total)` is called after every chunk (and tile); raising from it (e.g. an
        interrupt) stops the encode. `tiling` encodes spatial tiles separately and blends them.
        """
        _check_video(video, self.SPATIAL)
        video = video.to(device=self.device, dtype=self.dtype)
        if tiling is not None:
            return run_tiled(self._encode_whole, video, tiling, self.SPATIAL, 1, callback)
        return self._encode_whole(video, callback)

    def pixels_in(self, video: torch.Tensor) -> torch.Tensor:
        """What the encoder's first conv takes: the video itself (Wan 2.2 patchifies it first)."""
        return video

    def pixels_out(self, frames: torch.Tensor) -> torch.Tensor:
        """The decoder head's output as frames [B, 3, F, H, W] (Wan 2.2 unpatchifies it)."""
        return frames

    def _encode_whole(self, video: torch.Tensor, callback: Progress | None) -> torch.Tensor:
        video = self.pixels_in(video)
        frames = video.shape[2]
        chunks = [(0, 1)] + [(s, s + TEMPORAL_FACTOR) for s in range(1, frames, TEMPORAL_FACTOR)]
        cache = FrameCache()
        out = None
        for i, (start, stop) in enumerate(chunks):
            moments = self.conv1(self.encoder(video[:, :, start:stop], cache))
            mu = moments[:, : self.config.z_dim].float()
            if out is None:
                out = mu.new_empty((mu.shape[0], mu.shape[1], len(chunks), *mu.shape[3:]))
            out[:, :, i:i + 1] = mu
            if callback is not None:
                callback(i + 1, len(chunks))
        return out

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, callback: Progress | None = None,
               tiling: Tiling | None = None) -> torch.Tensor:
        """Raw latent [B,16,T,h,w] -> video [B,3,1+4(T-1),8h,8w] in -1..1 (float32).

        Decodes one latent frame at a time; `callback(done, total)` after each (and per tile).
        `tiling` decodes overlapping spatial tiles and blends the seams (for large frames).
        """
        if latent.dim() != 5 or latent.shape[1] != self.config.z_dim:
            raise ValueError(f"decode expects a latent [B,{self.config.z_dim},T,h,w], got {tuple(latent.shape)}")
        latent = latent.to(device=self.device, dtype=self.dtype)
        if tiling is not None:
            return run_tiled(self._decode_whole, latent, tiling, 1, self.SPATIAL, callback).clamp_(-1, 1)
        return self._decode_whole(latent, callback).clamp_(-1, 1)

    def _decode_whole(self, latent: torch.Tensor, callback: Progress | None) -> torch.Tensor:
        x = self.conv2(latent)
        steps = x.shape[2]
        cache = FrameCache()
        out = None
        written = 0
        for i in range(steps):
            frames = self.pixels_out(self.decoder(x[:, :, i:i + 1], cache)).float()
            if out is None:
                out = frames.new_empty((frames.shape[0], frames.shape[1], pixel_frames(steps), *frames.shape[3:]))
            out[:, :, written:written + frames.shape[2]] = frames
            written += frames.shape[2]
            if callback is not None:
                callback(i + 1, steps)
        return out


def _check_video(video: torch.Tensor, spatial: int = SPATIAL_FACTOR) -> None:
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"encode expects video [B,3,F,H,W] in -1..1, got shape {tuple(video.shape)}")
    frames, h, w = video.shape[2:]
    if (frames - 1) % TEMPORAL_FACTOR:
        lower = 1 + TEMPORAL_FACTOR * ((frames - 1) // TEMPORAL_FACTOR)
        raise ValueError(f"The Wan VAE encodes 1+4k frames (1, 5, 9, ..., 81); got {frames}. "
                         f"Trim to {lower} or pad to {lower + TEMPORAL_FACTOR} frames.")
    if h % spatial or w % spatial:
        raise ValueError(f"The Wan VAE needs width and height divisible by {spatial}; got {w}x{h}. "
                         "Resize or crop the frames first.")


__all__ = ["LATENT_MEAN", "LATENT_STD", "denormalize_latent", "normalize_latent"]
