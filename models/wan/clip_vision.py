"""The CLIP ViT-H/14 vision tower that gives Wan 2.1 I2V its image tokens.

Wan conditions on the hidden states after the 31st of 32 transformer blocks (no post-norm, no
projection): [B, 257, 1280] = the class token plus 16x16 patches. The same tower ships in three
layouts, all loaded here: the official Wan checkpoint (`visual.transformer.N.attn.to_qkv`, inside
the XLM-R CLIP file), ComfyUI's `clip_vision_h.safetensors` (HF `vision_model.encoder.layers.N...`)
and open_clip (`visual.transformer.resblocks.N.attn.in_proj_weight`). Module names follow the
official layout without its `visual.` prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import attention
from ..checkpoint import CheckpointError, load_state_dict
from .weights import (
    assign_weights,
    build_on_meta,
    dequantize_scaled_fp8,
    find_prefix,
    module_device,
    module_dtype,
    storage_dtype,
    take_prefixed,
)

Progress = Callable[[int, int], None]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int = 5120
    num_heads: int = 16
    num_layers: int = 32
    out_dim: int = 1024
    eps: float = 1e-5

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def feature_layers(self) -> int:
        """Blocks whose output Wan uses: all but the last (the 'penultimate hidden states')."""
        return self.num_layers - 1


VIT_H_14 = ClipVisionConfig()
# 16 heads like ViT-H (the head count is not stored in checkpoints, so tests keep it).
TINY_VIT = ClipVisionConfig(image_size=56, dim=64, mlp_dim=96, num_heads=16, num_layers=3, out_dim=16)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weights' dtype (as the reference does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, c // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v, layout="bshd").reshape(b, s, c))


class VisionBlock(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.norm1 = LayerNorm32(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = LayerNorm32(cfg.dim, eps=cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class WanClipVision(nn.Module):
    """pixels [B,3,224,224] (CLIP-normalised) -> features [B,257,1280] of the 31st block (float32)."""

    def __init__(self, cfg: ClipVisionConfig = VIT_H_14):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.dim))
        self.pre_norm = LayerNorm32(cfg.dim, eps=cfg.eps)
        self.transformer = nn.Sequential(*(VisionBlock(cfg) for _ in range(cfg.num_layers)))
        # Loaded so every layout checks completely; Wan's features stop before them.
        self.post_norm = LayerNorm32(cfg.dim, eps=cfg.eps)
        self.head = nn.Parameter(torch.zeros(cfg.dim, cfg.out_dim))

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, callback: Progress | None = None) -> torch.Tensor:
        """`callback(done, total)` runs after every block; raising from it stops the encode."""
        size = self.config.image_size
        if pixels.dim() != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"CLIP vision expects pixels [B,3,{size},{size}], got {tuple(pixels.shape)}; "
                             "use encode_image() to resize and normalise images")
        x = self.patch_embedding(pixels.to(device=self.device, dtype=self.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.pre_norm(x)
        used = self.transformer[: self.config.feature_layers]
        for i, block in enumerate(used):
            x = block(x)
            if callback is not None:
                callback(i + 1, len(used))
        return x.float()

    def preprocess(self, images: torch.Tensor, crop: bool = False) -> torch.Tensor:
        """[B,3,H,W] in 0..1 -> CLIP input [B,3,224,224].

        crop=False squashes the whole image to a square (official Wan); crop=True scales the short
        side to 224 and cuts the centre (ComfyUI's default) so the aspect ratio is kept.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W] in 0..1, got {tuple(images.shape)}")
        size = self.config.image_size
        images = images.float()
        h, w = images.shape[-2:]
        if crop:
            scale = size / min(h, w)
            resized = (max(size, round(h * scale)), max(size, round(w * scale)))
        else:
            resized = (size, size)
        if (h, w) != resized:
            images = F.interpolate(images, size=resized, mode="bicubic", align_corners=False)
        top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
        images = images[..., top:top + size, left:left + size]
        mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def encode_image(self, images: torch.Tensor, crop: bool = False,
                     callback: Progress | None = None) -> torch.Tensor:
        """[B,3,H,W] in 0..1 -> Wan image tokens [B,257,1280] (float32)."""
        return self(self.preprocess(images, crop=crop), callback=callback)

    # ---- loading -------------------------------------------------------------------------------

    @staticmethod
    def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> ClipVisionConfig:
        """Widths from the weight shapes, depth from the keys (official names, no prefix)."""
        needed = ("patch_embedding.weight", "pos_embedding", "transformer.0.mlp.0.weight", "head")
        absent = [k for k in needed if k not in sd]
        if absent:
            raise CheckpointError(f"Not a CLIP vision tower: missing tensor(s) {', '.join(absent)}.")
        dim, _, patch, _ = sd["patch_embedding.weight"].shape
        tokens = sd["pos_embedding"].shape[1]
        side = round((tokens - 1) ** 0.5)
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer\.(\d+)\.", k)))
        # The head count is not stored in the file; ViT-H/14 has 16 (pass num_heads for other towers).
        heads = VIT_H_14.num_heads
        return ClipVisionConfig(image_size=side * patch, patch_size=patch, dim=dim,
                                mlp_dim=sd["transformer.0.mlp.0.weight"].shape[0], num_heads=heads,
                                num_layers=layers, out_dim=sd["head"].shape[1])

    @classmethod
    def from_state_dict(cls, sd: MutableMapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, consume: bool = False,
                        num_heads: int | None = None) -> WanClipVision:
        """Build from the official Wan CLIP file, ComfyUI's clip_vision_h (HF) or an open_clip file."""
        found = find_prefix(sd, _ANCHORS)
        if found is None:
            raise CheckpointError(
                "Not a CLIP ViT-H/14 vision model: no tensor named like 'visual.transformer.0.attn.to_qkv.weight', "
                "'vision_model.encoder.layers.0.self_attn.q_proj.weight' or "
                "'visual.transformer.resblocks.0.attn.in_proj_weight'. Pick clip_vision_h.safetensors or "
                "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth.")
        prefix, anchor = found
        own = take_prefixed(sd, prefix)
        if consume:
            for key in [k for k in sd if k.startswith(prefix)]:
                del sd[key]
        dtype = dtype or storage_dtype(own)
        dequantize_scaled_fp8(own, dtype)
        own = _LAYOUTS[anchor](own)
        cfg = cls.config_from_state_dict(own)
        if num_heads is not None:
            cfg = ClipVisionConfig(**{**cfg.__dict__, "num_heads": num_heads})
        model = build_on_meta(lambda: cls(cfg))
        return assign_weights(model, own, "the CLIP ViT-H/14 vision tower", dtype=dtype, device=device, consume=True)

    @classmethod
    def from_file(cls, path: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  num_heads: int | None = None) -> WanClipVision:
        return cls.from_state_dict(load_state_dict(path), dtype=dtype, device=device, consume=True,
                                   num_heads=num_heads)


# ---- layouts -------------------------------------------------------------------------------------

def _from_official(sd: MutableMapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return take_prefixed(sd, "visual.")


def _rename(sd: Mapping[str, torch.Tensor], table: list[tuple[re.Pattern, str]], keep: re.Pattern
            ) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in sd.items():
        if not keep.match(key):
            continue
        for pattern, target in table:
            if pattern.match(key):
                key = pattern.sub(target, key)
                break
        out[key] = tensor
    return out


def _fuse_qkv(sd: MutableMapping[str, torch.Tensor], template: str) -> None:
    """Concatenate separate q/k/v projections (template has {n} for the block, {p} for q/k/v)."""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.(\d+)\.attn\.q\.", k))}
    for n in sorted(blocks):
        for kind in ("weight", "bias"):
            parts = [sd.pop(template.format(n=n, p=p, kind=kind), None) for p in "qkv"]
            if all(p is not None for p in parts):
                sd[f"transformer.{n}.attn.to_qkv.{kind}"] = torch.cat(parts, dim=0)


_HF_TABLE = [(re.compile(a), b) for a, b in [
    (r"^vision_model\.embeddings\.patch_embedding\.weight$", "patch_embedding.weight"),
    (r"^vision_model\.embeddings\.class_embedding$", "cls_embedding"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "pos_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "pre_norm."),
    (r"^vision_model\.post_layernorm\.", "post_norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"transformer.\1.attn.\2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.\1.mlp.0."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.\1.mlp.2."),
    (r"^visual_projection\.weight$", "head"),
]]
_HF_KEEP = re.compile(r"^(vision_model\.(?!embeddings\.position_ids)|visual_projection\.weight$)")


def _from_hf(sd: MutableMapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = _rename(sd, _HF_TABLE, _HF_KEEP)
    _fuse_qkv(out, "transformer.{n}.attn.{p}.{kind}")
    return _reshape_embeddings(out, transpose_head=True)


_OPEN_CLIP_TABLE = [(re.compile(a), b) for a, b in [
    (r"^visual\.conv1\.weight$", "patch_embedding.weight"),
    (r"^visual\.class_embedding$", "cls_embedding"),
    (r"^visual\.positional_embedding$", "pos_embedding"),
    (r"^visual\.ln_pre\.", "pre_norm."),
    (r"^visual\.ln_post\.", "post_norm."),
    (r"^visual\.proj$", "head"),
    (r"^visual\.transformer\.resblocks\.(\d+)\.ln_1\.", r"transformer.\1.norm1."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.ln_2\.", r"transformer.\1.norm2."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"transformer.\1.attn.to_qkv.\2"),
    (r"^visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"transformer.\1.attn.proj."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"transformer.\1.mlp.0."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"transformer.\1.mlp.2."),
]]


def _from_open_clip(sd: MutableMapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _reshape_embeddings(_rename(sd, _OPEN_CLIP_TABLE, re.compile(r"^visual\.")), transpose_head=False)


def _reshape_embeddings(sd: dict[str, torch.Tensor], transpose_head: bool) -> dict[str, torch.Tensor]:
    """HF/open_clip keep class and position embeddings without the batch axes; HF stores the projection transposed."""
    if "cls_embedding" in sd and sd["cls_embedding"].dim() == 1:
        sd["cls_embedding"] = sd["cls_embedding"].view(1, 1, -1)
    if "pos_embedding" in sd and sd["pos_embedding"].dim() == 2:
        sd["pos_embedding"] = sd["pos_embedding"].unsqueeze(0)
    if transpose_head and "head" in sd:
        sd["head"] = sd["head"].t().contiguous()
    return sd


_LAYOUTS = {
    "visual.transformer.0.attn.to_qkv.weight": _from_official,
    "transformer.0.attn.to_qkv.weight": dict,  # the tower alone, as this module names it
    "vision_model.encoder.layers.0.self_attn.q_proj.weight": _from_hf,
    "visual.transformer.resblocks.0.attn.in_proj_weight": _from_open_clip,
}
_ANCHORS = tuple(_LAYOUTS)
