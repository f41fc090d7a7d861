"""What the Wan nodes do with the encoders: prompts to embeddings, an image to CLIP tokens, a start
image to the image-to-video conditioning, and latents back to frames.

Handles here are small frozen dataclasses around a loaded module; the functions move the module to
the compute device for the call and back when asked (`offload`), so a 11 GB text encoder does not
sit in VRAM while the DiT samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import WanInputError
from .pipeline import LATENT_CHANNELS, WanImageEmbeds, WanTextEmbeds
from .t5 import UMT5Encoder
from .tiling import Tiling
from .tokenizer import UMT5Tokenizer
from .vae import WanVAE, normalize_latent

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class WanTextEncoderHandle:
    encoder: UMT5Encoder
    tokenizer: UMT5Tokenizer
    name: str
    resident_device: torch.device


@dataclass(frozen=True)
class WanClipVisionHandle:
    model: nn.Module        # models/wan/clip_vision.WanClipVision: encode_image([B,3,H,W] 0..1, crop)
    name: str
    resident_device: torch.device


@dataclass(frozen=True)
class WanVAEHandle:
    vae: WanVAE
    name: str
    resident_device: torch.device


@contextmanager
def on_device(module: nn.Module, device: torch.device, home: torch.device, offload: bool) -> Iterator[nn.Module]:
    """Run `module` on `device`; afterwards send it back to `home` if `offload` (also after errors)."""
    module.to(device)
    try:
        yield module
    finally:
        if offload and torch.device(device) != torch.device(home):
            module.to(home)


def split_prompts(text: str) -> list[str]:
    """'a cat | a dog' -> ['a cat', 'a dog']: one prompt per section of the video (context windows)."""
    parts = [p.strip() for p in text.split("|")]
    return [p for p in parts if p] or [""]


def encode_text(handle: WanTextEncoderHandle, positive: str, negative: str, device: torch.device,
                offload: bool = True, progress: Progress | None = None) -> WanTextEmbeds:
    """umT5 embeddings trimmed to each prompt's real length (EOS included); `progress(done, total)`
    after every layer (XXL on a CPU takes a while)."""
    prompts = split_prompts(positive)
    with torch.no_grad(), on_device(handle.encoder, device, handle.resident_device, offload) as enc:
        tokens = handle.tokenizer(prompts + [negative])
        hidden = enc.encode(tokens, callback=progress).cpu()
    rows = [hidden[i, :n].clone() for i, n in enumerate(tokens.lengths)]
    return WanTextEmbeds(tuple(rows[:-1]), rows[-1])


def require_images(images: object, name: str) -> None:
    """Refuse an input that is not a non-empty IMAGE [B,H,W,C]; `name` is the node's input name."""
    shape = tuple(images.shape) if isinstance(images, torch.Tensor) else None
    if shape is None or len(shape) != 4:
        got = f"shape {shape}" if shape is not None else f"a {type(images).__name__}"
        raise WanInputError(f"{name} must be an IMAGE [batch, height, width, channels]; got {got}. "
                            "Connect a Load Image output.")
    if 0 in shape:
        raise WanInputError(f"{name} is empty (shape {shape}): it holds no image. Connect a node that gives at "
                            "least one image (an empty batch usually comes from a filter or a batch split upstream).")


def images_to_channels_first(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] 0..1 -> [B,3,H,W] (alpha dropped, grey expanded)."""
    require_images(images, "the IMAGE input")
    x = images[..., :3].permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def encode_clip(handle: WanClipVisionHandle, images: torch.Tensor, device: torch.device, crop: bool,
                strength: float = 1.0, offload: bool = True, progress: Progress | None = None) -> torch.Tensor:
    """CLIP tokens [1, 257, width] of an IMAGE batch (several images are averaged), times `strength`;
    `progress(done, total)` after every block."""
    pixels = images_to_channels_first(images)
    with torch.no_grad(), on_device(handle.model, device, handle.resident_device, offload) as model:
        feats = model.encode_image(pixels.to(device), crop=crop, callback=progress).float().cpu()
    return feats.mean(dim=0, keepdim=True) * strength


def resize_to(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B,3,H,W] -> [B,3,height,width], bicubic with antialiasing (when shrinking), clamped to 0..1."""
    if pixels.shape[-2:] == (height, width):
        return pixels
    return F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False,
                         antialias=True).clamp(0, 1)


def i2v_mask(num_frames: int, latent_h: int, latent_w: int, known_frames: int = 1) -> torch.Tensor:
    """[4, T, h, w]: 1 where a pixel frame is given. Frame 0's mask is repeated 4x so the 1+4k pixel
    frames fold into 4 channels per latent frame (the official layout)."""
    mask = torch.zeros(num_frames, latent_h, latent_w)
    mask[:known_frames] = 1
    mask = torch.cat([mask[:1].repeat(3, 1, 1), mask])          # (F + 3) frames
    return mask.view(-1, 4, latent_h, latent_w).transpose(0, 1).contiguous()


def image_to_video_embeds(vae: WanVAEHandle, start_image: torch.Tensor, width: int, height: int, num_frames: int,
                          device: torch.device, noise_aug_strength: float = 0.0, clip: torch.Tensor | None = None,
                          negative_clip: torch.Tensor | None = None, offload: bool = True,
                          tiling: Tiling | None = None, progress: Progress | None = None) -> WanImageEmbeds:
    """The conditioning of an image-to-video run: the start frame followed by mid-grey frames, VAE-encoded
    and normalised, behind the 4-channel frame mask. `width`, `height`, `num_frames` must already be valid."""
    pixels = resize_to(images_to_channels_first(start_image[:1]), width, height) * 2.0 - 1.0   # [1,3,H,W]
    if noise_aug_strength > 0:
        generator = torch.Generator().manual_seed(0)  # fixed: the same inputs give the same conditioning
        pixels = pixels + noise_aug_strength * torch.randn(pixels.shape, generator=generator)
    video = torch.zeros(1, 3, num_frames, height, width)
    video[:, :, 0] = pixels[0]
    with torch.no_grad(), on_device(vae.vae, device, vae.resident_device, offload) as model:
        latent = model.encode(video, callback=progress, tiling=tiling).cpu()
    y = torch.cat([i2v_mask(num_frames, height // 8, width // 8), normalize_latent(latent)[0]])
    assert y.shape[0] == 4 + LATENT_CHANNELS
    return WanImageEmbeds(width, height, num_frames, y=y, clip=clip, negative_clip=negative_clip)


def decode_latent(vae: WanVAEHandle, latent: torch.Tensor, device: torch.device, offload: bool = True,
                  tiling: Tiling | None = None, progress: Progress | None = None) -> torch.Tensor:
    """Raw latent [B,16,T,h,w] -> IMAGE [B·F, H, W, 3] in 0..1 (batch items one after another).

    `progress(done, total)` counts the decode steps of the whole batch (latent frames, times tiles)."""
    if latent.dim() == 5 and latent.shape[1] == LATENT_CHANNELS and 0 in latent.shape:
        raise WanInputError(f"Wan Decode got an empty video latent {tuple(latent.shape)} (no frames or no pixels); "
                            "connect the samples of a sampler run with at least one frame.")
    if latent.dim() != 5 or latent.shape[1] != LATENT_CHANNELS:
        raise WanInputError(f"Wan Decode needs a video latent [B, {LATENT_CHANNELS}, T, h, w]; got {tuple(latent.shape)}. "
                         "An image latent [B, C, h, w] is not a Wan video latent.")
    frames = []
    batch = latent.shape[0]
    with torch.no_grad(), on_device(vae.vae, device, vae.resident_device, offload) as model:
        for index, item in enumerate(latent):
            item_progress = None if progress is None else \
                (lambda done, total, index=index: progress(index * total + done, batch * total))
            video = model.decode(item[None], callback=item_progress, tiling=tiling)[0]      # [3, F, H, W]
            frames.append(((video.float().cpu() + 1.0) * 0.5).clamp(0, 1).permute(1, 2, 3, 0))
    return torch.cat(frames)
