"""Reference images and masks prepared for training, and reference contexts on disk.

Images keep their aspect ratio: each is scaled to about `size`² pixels with both sides a multiple
of 16 (one DiT patch covers 16 px), covering the target and centre-cropping the overflow. A mask
goes through the identical scale-and-crop so it stays aligned, then is averaged down to the latent
grid as a loss weight.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError
from .context_tokens import ReferenceContext
from .errors import InvalidReferenceImageShape

PATCH_PIXELS = 16
CONTEXT_FORMAT = "slipstream.anima.reference_context"
CONTEXT_VERSION = 1


def split_images(image, name: str) -> list[torch.Tensor]:
    """An IMAGE batch [B, H, W, C>=3] as a list of [H, W, 3] images, or a clear shape error."""
    if not isinstance(image, torch.Tensor):
        raise InvalidReferenceImageShape(f"{name} is a {type(image).__name__}, not an IMAGE tensor "
                                         "[batch, height, width, channels]. Connect a Load Image output.")
    shape = tuple(image.shape)
    if image.ndim != 4 or shape[-1] < 3 or shape[1] < 8 or shape[2] < 8 or shape[0] < 1:
        raise InvalidReferenceImageShape(
            f"{name} has shape {shape}; expected [batch, height, width, channels] with at least 3 channels "
            "and 8×8 pixels (an IMAGE such as Load Image gives, e.g. (1, 768, 512, 3)).")
    if image.dtype == torch.uint8:          # 8-bit pixels from a custom node: scale to the IMAGE range 0..1
        image = image.float() / 255.0
    elif not image.is_floating_point():
        raise InvalidReferenceImageShape(
            f"{name} holds {str(image.dtype).removeprefix('torch.')} values; an IMAGE holds floats in 0..1. "
            "Convert it (or connect a Load Image output).")
    return [img[..., :3] for img in image]


def split_masks(mask, name: str, count: int) -> list[torch.Tensor]:
    """A MASK [B, H, W] (or [H, W]) as `count` masks: one per image, or one shared by all."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InvalidReferenceImageShape(f"{name} has shape {shape}; expected a MASK [batch, height, width].")
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.shape[0] not in (1, count):
        raise InvalidReferenceImageShape(
            f"{name} holds {mask.shape[0]} masks for {count} reference image(s); give one mask, or one per image.")
    return [mask[min(i, mask.shape[0] - 1)] for i in range(count)]


def training_hw(height: int, width: int, size: int) -> tuple[int, int]:
    """About size² pixels at the image's aspect ratio, both sides multiples of 16 (at least 16)."""
    scale = size / math.sqrt(height * width)
    h = max(PATCH_PIXELS, round(height * scale / PATCH_PIXELS) * PATCH_PIXELS)
    w = max(PATCH_PIXELS, round(width * scale / PATCH_PIXELS) * PATCH_PIXELS)
    return h, w


def _cover_and_crop(x: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    """[N, C, H, W] scaled to cover (h, w), then centre-cropped to exactly (h, w)."""
    H, W = x.shape[-2:]
    scale = max(h / H, w / W)
    sh, sw = max(h, round(H * scale)), max(w, round(W * scale))
    if (sh, sw) != (H, W):
        kwargs = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
        x = F.interpolate(x, size=(sh, sw), mode=mode, **kwargs)
    top, left = (sh - h) // 2, (sw - w) // 2
    return x[..., top:top + h, left:left + w]


def fit_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """[H, W, 3] in 0..1 -> [1, h, w, 3] at the training size (IMAGE layout, what VAE.encode takes)."""
    h, w = training_hw(image.shape[0], image.shape[1], size)
    x = image.float().permute(2, 0, 1)[None]
    return _cover_and_crop(x, h, w, "bilinear").clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def fit_mask(mask: torch.Tensor, image_hw: tuple[int, int], size: int, name: str) -> torch.Tensor:
    """[H, W] mask aligned with an image of `image_hw`, through the same scale-and-crop: [h, w] in 0..1."""
    mh, mw = mask.shape[-2:]
    ih, iw = image_hw
    if (mh, mw) != (ih, iw):
        if abs(mh / mw - ih / iw) > 0.01 * (ih / iw):
            raise InvalidReferenceImageShape(
                f"{name} is {mw}×{mh} but its reference image is {iw}×{ih}; the mask must match the image "
                "(same size, or at least the same aspect ratio).")
        mask = F.interpolate(mask.float()[None, None], size=(ih, iw), mode="bilinear", align_corners=False)[0, 0]
    h, w = training_hw(ih, iw, size)
    return _cover_and_crop(mask.float()[None, None], h, w, "bilinear")[0, 0].clamp(0, 1)


def latent_weight(mask: torch.Tensor, latent_hw: tuple[int, int], name: str) -> torch.Tensor:
    """A pixel mask averaged onto the latent grid: [1, 1, 1, h, w] loss weights; refuses an empty mask."""
    weight = F.adaptive_avg_pool2d(mask.float()[None, None], latent_hw)[:, :, None]
    if float(weight.sum()) <= 1e-3:
        raise InvalidReferenceImageShape(
            f"{name} is empty (all zero) after fitting it to the training size, so there is nothing to learn from. "
            "White (1) marks the region to learn; invert the mask if it is the other way round.")
    return weight


def context_to_file_dict(ctx: ReferenceContext) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) for a safetensors file."""
    meta = {
        "format": CONTEXT_FORMAT, "version": str(CONTEXT_VERSION),
        "steps": str(ctx.steps), "learning_rate": repr(ctx.learning_rate), "final_loss": repr(ctx.final_loss),
        "reference_count": str(ctx.reference_count), "training_prompt": ctx.training_prompt,
        "image_sizes": json.dumps([list(s) for s in ctx.image_sizes]),
    }
    tensors = {"tokens": ctx.tokens.detach().float().cpu().contiguous(),
               "loss_history": torch.tensor(ctx.loss_history, dtype=torch.float32)}
    return tensors, meta


def context_from_file_dict(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str) -> ReferenceContext:
    """A ReferenceContext from a saved file's tensors and metadata, every field checked (a damaged or
    hand-edited file fails with CheckpointError naming the file and the field)."""
    if meta.get("format") != CONTEXT_FORMAT or "tokens" not in tensors:
        raise CheckpointError(f"{path} is not a Slipstream Anima reference context (no '{CONTEXT_FORMAT}' "
                              "metadata). Choose a file saved by 'Save Anima Reference Context'.")
    version = _meta_number(meta, "version", int, path, "0")
    if version > CONTEXT_VERSION:
        raise CheckpointError(f"{path} was written by a newer Slipstream (format version {version}); update the pack.")
    tokens = tensors["tokens"]
    if tokens.ndim != 3 or not tokens.is_floating_point() or 0 in tokens.shape:
        raise CheckpointError(f"{path}: tokens are {tokens.dtype} of shape {tuple(tokens.shape)}, expected "
                              "floating-point [blocks, tokens, width]. Save the context again.")
    tokens = tokens.float()
    if not bool(torch.isfinite(tokens).all()):
        raise CheckpointError(f"{path}: the tokens hold non-finite values (NaN or inf), so they cannot steer a "
                              "model. Train the context again (a lower learning rate) and save it.")
    history = tensors.get("loss_history")
    return ReferenceContext(
        tokens=tokens, steps=_meta_number(meta, "steps", int, path, "0"),
        learning_rate=_meta_number(meta, "learning_rate", float, path, "nan"),
        final_loss=_meta_number(meta, "final_loss", float, path, "nan"),
        reference_count=_meta_number(meta, "reference_count", int, path, "0"),
        training_prompt=meta.get("training_prompt", ""),
        image_sizes=_image_sizes(meta.get("image_sizes", "[]"), path),
        loss_history=tuple(history.float().flatten().tolist()) if history is not None else ())


def _meta_number(meta: dict[str, str], key: str, kind: type, path: str, default: str):
    raw = meta.get(key, default)
    try:
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: metadata '{key}' is {raw!r}, not a number. The file is damaged; save the "
                              "context again.") from exc


def _image_sizes(raw: str, path: str) -> tuple[tuple[int, int], ...]:
    try:
        sizes = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata 'image_sizes' is not valid JSON ({exc}). The file is damaged; "
                              "save the context again.") from exc
    if not isinstance(sizes, list) or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
            for s in sizes):
        raise CheckpointError(f"{path}: metadata 'image_sizes' is {raw[:80]!r}, not a list of [height, width]. "
                              "The file is damaged; save the context again.")
    return tuple((h, w) for h, w in sizes)
