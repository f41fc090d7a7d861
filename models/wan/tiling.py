"""Spatial tiling with blended seams, for running a video VAE on frames larger than memory allows.

A tile grid is laid out in latent units (so encode and decode tiles line up on the 8-pixel grid);
each tile is processed on its own and written into the output with a weight that ramps linearly
across the overlap with its neighbours and stays 1 on the image border. Dividing by the summed
weights makes the blend exact where tiles agree and smooth where they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Tiling:
    """Tile size and overlap in latent units (×8 pixels for the Wan VAE)."""

    tile: int = 32
    overlap: int = 8

    def __post_init__(self):
        if self.tile < 2:
            raise ValueError(f"tile size must be at least 2 latent pixels (16 px), got {self.tile} latent pixels: "
                             "raise tile_size to 16 px or more (or turn tiling off).")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile overlap must be between 0 and tile-1 ({self.tile - 1}) latent pixels, got "
                             f"{self.overlap}: lower tile_overlap below tile_size (by at least 8 px), or raise "
                             "tile_size.")

    @classmethod
    def from_pixels(cls, tile_px: int, overlap_px: int, scale: int = 8) -> Tiling:
        """A tiling given in pixels (what node users see), rounded to the latent grid."""
        return cls(tile=max(2, tile_px // scale), overlap=max(0, overlap_px // scale))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile`, neighbours overlapping by >= `overlap`.

    The last tile is aligned to the end instead of running past it, so every tile has full size.
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, fade_in: int, fade_out: int, device) -> torch.Tensor:
    """1 in the middle, rising linearly over `fade_in` samples and falling over `fade_out`."""
    w = torch.ones(size, device=device, dtype=torch.float32)
    if fade_in > 0:
        w[:fade_in] = (torch.arange(fade_in, device=device, dtype=torch.float32) + 0.5) / fade_in
    if fade_out > 0:
        w[size - fade_out:] = torch.minimum(
            w[size - fade_out:],
            (torch.arange(fade_out, 0, -1, device=device, dtype=torch.float32) - 0.5) / fade_out)
    return w


def _axis_plan(length: int, tiling: Tiling) -> list[tuple[int, int, int, int]]:
    """(start, size, overlap with previous tile, overlap with next tile) along one axis, latent units."""
    size = min(tiling.tile, length)
    starts = tile_starts(length, size, tiling.overlap)
    plan = []
    for i, s in enumerate(starts):
        before = (starts[i - 1] + size - s) if i > 0 else 0
        after = (s + size - starts[i + 1]) if i + 1 < len(starts) else 0
        plan.append((s, size, before, after))
    return plan


def run_tiled(fn: Callable[[torch.Tensor, Progress | None], torch.Tensor], x: torch.Tensor, tiling: Tiling,
              in_scale: int, out_scale: int, callback: Progress | None = None) -> torch.Tensor:
    """Apply `fn` to spatial tiles of `x` ([B,C,T,H,W]) and blend the results.

    `in_scale`/`out_scale` are pixels per latent unit of the input and of the output (decode: 1 and
    8; encode: 8 and 1). `fn(tile, progress)` gets a tile and a progress function for its own steps
    (done, total); `callback(done, total)` sees the steps of all tiles added up.
    """
    lat_h, lat_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    rows, cols = _axis_plan(lat_h, tiling), _axis_plan(lat_w, tiling)
    n_tiles = len(rows) * len(cols)
    out = weight = None
    for index, ((h0, th, hb, ha), (w0, tw, wb, wa)) in enumerate((r, c) for r in rows for c in cols):
        piece = x[..., h0 * in_scale:(h0 + th) * in_scale, w0 * in_scale:(w0 + tw) * in_scale]
        inner = None
        if callback is not None:
            def inner(done, total, _base=index):
                callback(_base * total + done, n_tiles * total)
        y = fn(piece, inner)
        if out is None:
            out = torch.zeros((*y.shape[:-2], lat_h * out_scale, lat_w * out_scale), dtype=torch.float32,
                              device=y.device)
            weight = torch.zeros((lat_h * out_scale, lat_w * out_scale), dtype=torch.float32, device=y.device)
        mask = torch.outer(_ramp(th * out_scale, hb * out_scale, ha * out_scale, y.device),
                           _ramp(tw * out_scale, wb * out_scale, wa * out_scale, y.device))
        rs = slice(h0 * out_scale, (h0 + th) * out_scale)
        cs = slice(w0 * out_scale, (w0 + tw) * out_scale)
        out[..., rs, cs] += y.float() * mask
        weight[rs, cs] += mask
        del y
    return out / weight
