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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import attention
from ...kernels.cast_linear import CastLinear
from ..checkpoint import CheckpointError
from ..common.state_dict import count_numbered
from .layers import FP32LayerNorm
from .weights import LoadableEncoder, Recipe, Source, identity_recipe, rename

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


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = CastLinear(dim, dim * 3)
        self.proj = CastLinear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, c // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v, layout="bshd").reshape(b, s, c))


class VisionBlock(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.norm1 = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = nn.Sequential(CastLinear(cfg.dim, cfg.mlp_dim), nn.GELU(), CastLinear(cfg.mlp_dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---- layouts: model key <- file key(s) ---------------------------------------------------------

def _rename(keys: Sequence[str], table: list[tuple[re.Pattern, str]], keep: re.Pattern) -> dict[str, str]:
    """model key -> file key for the kept keys (unmatched kept keys keep their name, and fail the check)."""
    return {rename(key, table): key for key in keys if keep.match(key)}


def _official_recipe(keys: Sequence[str]) -> Recipe:
    return {k[len("visual."):]: Source((k,)) for k in keys if k.startswith("visual.")}


def _as_batched(shape_prefix: tuple[int, ...]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """HF/open_clip keep class and position embeddings without the leading batch axes."""
    return lambda parts: parts[0].reshape(*shape_prefix, parts[0].shape[-1])


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def _transposed(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0].t().contiguous()


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
_SPLIT_QKV = re.compile(r"^(transformer\.\d+\.attn)\.q\.(weight|bias)$")


def _hf_recipe(keys: Sequence[str]) -> Recipe:
    names = _rename(keys, _HF_TABLE, _HF_KEEP)
    recipe: Recipe = {}
    for target, key in names.items():
        if re.match(r"^transformer\.\d+\.attn\.[kv]\.", target):
            continue  # fused with q below
        fused = _SPLIT_QKV.match(target)
        if fused:
            parts = [names.get(f"{fused.group(1)}.{p}.{fused.group(2)}") for p in "qkv"]
            if all(parts):
                recipe[f"{fused.group(1)}.to_qkv.{fused.group(2)}"] = Source(tuple(parts), _cat_rows)
                continue
        recipe[target] = Source((key,), {"cls_embedding": _as_batched((1, 1)), "pos_embedding": _as_batched((1, -1)),
                                         "head": _transposed}.get(target))
    return recipe


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


def _open_clip_recipe(keys: Sequence[str]) -> Recipe:
    names = _rename(keys, _OPEN_CLIP_TABLE, re.compile(r"^visual\."))
    return {target: Source((key,), {"cls_embedding": _as_batched((1, 1)),
                                    "pos_embedding": _as_batched((1, -1))}.get(target))
            for target, key in names.items()}


_LAYOUTS = {
    "visual.transformer.0.attn.to_qkv.weight": _official_recipe,
    "transformer.0.attn.to_qkv.weight": identity_recipe,  # the tower alone, as this module names it
    "vision_model.encoder.layers.0.self_attn.q_proj.weight": _hf_recipe,
    "visual.transformer.resblocks.0.attn.in_proj_weight": _open_clip_recipe,
}


class WanClipVision(LoadableEncoder):
    """pixels [B,3,224,224] (CLIP-normalised) -> features [B,257,1280] of the 31st block (float32).

    Loads (`from_file`, `from_state_dict`) the official Wan CLIP file, ComfyUI's clip_vision_h (HF)
    and open_clip files; `num_heads=` overrides the head count, which checkpoints do not store.
    """

    LAYOUTS = _LAYOUTS
    WHAT = "the CLIP ViT-H/14 vision tower"
    NOT_FOUND = ("not a CLIP ViT-H/14 vision model: no tensor named like 'visual.transformer.0.attn.to_qkv.weight', "
                 "'vision_model.encoder.layers.0.self_attn.q_proj.weight' or "
                 "'visual.transformer.resblocks.0.attn.in_proj_weight'. Pick clip_vision_h.safetensors or "
                 "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth.")

    def __init__(self, cfg: ClipVisionConfig = VIT_H_14):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.dim))
        self.pre_norm = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        self.transformer = nn.Sequential(*(VisionBlock(cfg) for _ in range(cfg.num_layers)))
        # Loaded so every layout checks completely; Wan's features stop before them.
        self.post_norm = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Parameter(torch.zeros(cfg.dim, cfg.out_dim))

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
    def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], num_heads: int | None = None) -> ClipVisionConfig:
        """Widths from the weight shapes, depth from the keys (official names, no prefix).

        The head count is not stored in checkpoints; ViT-H/14 has 16 (pass num_heads for others).
        """
        needed = ("patch_embedding.weight", "pos_embedding", "transformer.0.mlp.0.weight", "head")
        absent = [k for k in needed if k not in shapes]
        if absent:
            raise CheckpointError(f"Not a CLIP vision tower: missing tensor(s) {', '.join(absent)}.")
        dim, _, patch, _ = shapes["patch_embedding.weight"]
        side = round((shapes["pos_embedding"][1] - 1) ** 0.5)
        layers = count_numbered(shapes, "transformer.")
        return ClipVisionConfig(image_size=side * patch, patch_size=patch, dim=dim,
                                mlp_dim=shapes["transformer.0.mlp.0.weight"][0],
                                num_heads=num_heads or VIT_H_14.num_heads, num_layers=layers,
                                out_dim=shapes["head"][1])
