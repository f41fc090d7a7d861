"""The Wan 2.2 VAE (TI2V-5B): video <-> 48-channel latent, 4x in time and 16x in space.

What differs from the Wan 2.1 VAE (vae.py, whose causal layers and chunked encode/decode this
module reuses):

- **patchify**: the frames are folded 2x2 into channels before the encoder (3 -> 12 channels, the
  channel of pixel (2h+q, 2w+r) of colour c is c·4 + r·2 + q) and unfolded after the decoder, so the
  convolutional tower itself only compresses 8x.
- **residual down/up-sampling**: every encoder stage is a `DownResidualBlock` whose input also
  reaches its output through `AvgDown3D` (space/time folded into channels, then group-averaged to
  the output width), and every decoder stage an `UpResidualBlock` with `DupUp3D` (channels repeated,
  then unfolded into space/time; the first chunk keeps only its last frame, as the time-doubling
  upsampler does not double the first latent frame).
- the upsamplers keep their width (Wan 2.1's halve it); the decoder is wider than the encoder
  (`dec_dim` 256 vs `dim` 160); latent statistics are Wan 2.2's own (latents.py).

Module names equal the official checkpoint's keys (`encoder.downsamples.0.downsamples.0.residual.0.gamma`,
`decoder.upsamples.0.upsamples.3.time_conv.weight`, ...) so `Wan2.2_VAE.pth` and ComfyUI's
`wan2.2_vae.safetensors` load without renaming. `load_wan_vae` opens either generation's file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import CheckpointError
from .latents import WAN22_MEAN
from .vae import (
    CausalConv3d,
    CausalLayer,
    Decoder3d,
    Encoder3d,
    FrameCache,
    Resample,
    ResidualBlock,
    WanVAE,
    WanVAEConfig,
    _run_layers,
    middle_stack,
    output_head,
)
from .weights import TensorTable

PATCH = 2              # pixels folded into channels per side before the encoder
SPATIAL_FACTOR = 16    # 8 from the tower x the 2x2 patchify


@dataclass(frozen=True)
class Wan22VAEConfig(WanVAEConfig):
    """The Wan 2.1 VAE's fields (`dim` is the encoder's base width) plus a wider decoder."""

    dim: int = 160
    z_dim: int = 48
    dec_dim: int = 256      # decoder base width


WAN22_VAE = Wan22VAEConfig()
# Every block type at a twentieth of the width; the latent keeps its 48 channels (its statistics are fixed).
TINY_VAE22 = Wan22VAEConfig(dim=8, dec_dim=8)


def patchify(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, C·p·p, F, H/p, W/p]; channel c·p² + r·p + q holds pixel (p·h + q, p·w + r)."""
    b, c, f, h, w = x.shape
    x = x.view(b, c, f, h // patch, patch, w // patch, patch)          # b c f h q w r
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * patch * patch, f, h // patch, w // patch)


def unpatchify(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """The inverse of `patchify`."""
    b, cpp, f, h, w = x.shape
    x = x.view(b, cpp // (patch * patch), patch, patch, f, h, w)       # b c r q f h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (patch * patch), f, h * patch, w * patch)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of a downsampling stage: fold (ft x fs x fs) neighbourhoods into
    channels (the front of the clip zero-padded to a multiple of ft), then average consecutive
    groups of those channels down to `out_dim`."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        self.out_dim = out_dim
        folded = in_dim * factor_t * factor_s * factor_s
        if folded % out_dim:
            raise ValueError(f"AvgDown3D: {in_dim} channels x {factor_t * factor_s ** 2} do not group into {out_dim}")
        self.group = folded // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        pad = (ft - x.shape[2] % ft) % ft
        if pad:
            x = torch.cat([x.new_zeros(*x.shape[:2], pad, *x.shape[3:]), x], dim=2)
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(CausalLayer):
    """Parameter-free shortcut of an upsampling stage: repeat each channel, unfold the copies into
    (ft x fs x fs) neighbourhoods. On the first chunk only the last ft-th frame is kept."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        self.out_dim = out_dim
        unfolded = out_dim * factor_t * factor_s * factor_s
        if unfolded % in_dim:
            raise ValueError(f"DupUp3D: {in_dim} channels do not repeat into {out_dim} x {factor_t * factor_s ** 2}")
        self.repeats = unfolded // in_dim

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        if cache is not None and cache.get(self) is None:      # the first chunk: its frame is not doubled
            cache.put(self, FrameCache.FIRST_CHUNK_SEEN)
            x = x[:, :, ft - 1:]
        return x


class DownResidualBlock(CausalLayer):
    """Residual blocks then the downsampler, plus the AvgDown3D shortcut around all of them."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        return _run_layers(self.downsamples, x, cache) + self.avg_shortcut(x)


class UpResidualBlock(CausalLayer):
    """Residual blocks then the upsampler, plus the DupUp3D shortcut (only where it upsamples)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", halve_on_upsample=False))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        main = _run_layers(self.upsamples, x, cache)
        return main if self.avg_shortcut is None else main + self.avg_shortcut(x, cache)


class Encoder22(Encoder3d):
    """The Wan 2.1 encoder's layout (conv1, downsamples, middle, head; its forward) over residual stages."""

    def __init__(self, cfg: Wan22VAEConfig):
        CausalLayer.__init__(self)
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownResidualBlock(dims[i], dims[i + 1], cfg.num_res_blocks,
                              temporal=i < len(cfg.temporal_downsample) and cfg.temporal_downsample[i], down=i != last)
            for i in range(len(cfg.dim_mult))))
        self.middle = middle_stack(dims[-1])
        self.head = output_head(dims[-1], 2 * cfg.z_dim)


class Decoder22(Decoder3d):
    """The Wan 2.1 decoder's layout (conv1, middle, upsamples, head; its forward) over residual stages."""

    def __init__(self, cfg: Wan22VAEConfig):
        CausalLayer.__init__(self)
        dims = [cfg.dec_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = middle_stack(dims[0])
        self.upsamples = nn.Sequential(*(
            UpResidualBlock(dims[i], dims[i + 1], cfg.num_res_blocks + 1,
                            temporal=i < len(cfg.temporal_upsample) and cfg.temporal_upsample[i], up=i != last)
            for i in range(len(cfg.dim_mult))))
        self.head = output_head(dims[-1], 3 * PATCH * PATCH)


class Wan22VAE(WanVAE):
    """The Wan 2.2 VAE. `encode` takes [B,3,F,H,W] in -1..1 (F = 1+4k, H and W multiples of 16) and
    returns the raw latent [B,48,1+k,H/16,W/16] (float32); `decode` inverts it (clamped to -1..1).
    Chunking, progress, tiling and loading are the Wan 2.1 VAE's (see `WanVAE`)."""

    GENERATION = "2.2"
    SPATIAL = SPATIAL_FACTOR
    LATENT_CHANNELS = len(WAN22_MEAN)
    WHAT = "the Wan 2.2 VAE"
    NOT_FOUND = ("not a Wan 2.2 VAE: no tensor named like 'decoder.middle.0.residual.0.gamma' (with or without a "
                 "prefix). Pick the Wan 2.2 VAE file (e.g. wan2.2_vae.safetensors).")

    def __init__(self, cfg: Wan22VAEConfig = WAN22_VAE):
        nn.Module.__init__(self)
        self.config = cfg
        self.encoder = Encoder22(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder22(cfg)

    @staticmethod
    def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> Wan22VAEConfig:
        """Widths from `encoder.conv1` and `decoder.conv1`, latent channels from `conv2`."""
        for key in ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight"):
            if key not in shapes:
                raise CheckpointError(f"Not a Wan 2.2 VAE: missing tensor {key}.")
        z_dim = shapes["conv2.weight"][0]
        if z_dim != len(WAN22_MEAN) or shapes["encoder.conv1.weight"][1] != 3 * PATCH * PATCH:
            raise CheckpointError(
                f"This VAE has {z_dim} latent channels and takes {shapes['encoder.conv1.weight'][1]} input channels; "
                f"the Wan 2.2 VAE has {len(WAN22_MEAN)} and takes {3 * PATCH * PATCH} (patchified RGB). "
                "A 16-channel VAE is the Wan 2.1 VAE (load it with WanVAE).")
        mult = WAN22_VAE.dim_mult[-1]
        return Wan22VAEConfig(dim=shapes["encoder.conv1.weight"][0], dec_dim=shapes["decoder.conv1.weight"][0] // mult,
                              z_dim=z_dim)

    def pixels_in(self, video: torch.Tensor) -> torch.Tensor:
        return patchify(video)

    def pixels_out(self, frames: torch.Tensor) -> torch.Tensor:
        return unpatchify(frames)


def is_wan22_vae(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether VAE weights (under any prefix) are the Wan 2.2 VAE: 48 latent channels or a 12-channel first conv."""
    for key, shape in shapes.items():
        if key.endswith("encoder.conv1.weight") and len(shape) == 5 and shape[1] == 3 * PATCH * PATCH:
            return True
        if key.endswith("conv2.weight") and not key.endswith("decoder.conv2.weight") and shape[0] == len(WAN22_MEAN):
            return True
    return False


def load_wan_vae(path: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> WanVAE:
    """Open a Wan VAE file of either generation (told apart by its shapes) as `WanVAE` or `Wan22VAE`."""
    table = TensorTable.from_file(path)
    cls = Wan22VAE if is_wan22_vae(table.shapes) else WanVAE
    return cls._load(table, dtype, device, None, {})

