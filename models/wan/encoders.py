"""What the Wan nodes do with the encoders: prompts to embeddings, an image to CLIP tokens, a start
(and end) image to the image-to-video conditioning, and latents back to frames.

The VAE decides the conditioning's form: with the Wan 2.1 VAE the start (and end) frame become the
20 `y` channels of I2V / FLF2V / A14B models; with the Wan 2.2 VAE the start frame becomes the
clean first latent frame TI2V-5B keeps (clean_frames.py).

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

from .clean_frames import VAE_FILES, clean_latent_frames, first_frames_mask
from .errors import WanInputError
from .pipeline import WanImageEmbeds, WanTextEmbeds
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
                strength: float = 1.0, offload: bool = True, progress: Progress | None = None,
                end_images: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP tokens [1, 257, width] of an IMAGE batch (several images are averaged), times `strength`;
    `progress(done, total)` after every block. With `end_images`, the start tokens then the end
    tokens: [1, 514, width], the two-image context FLF2V expects (plain I2V models take it too)."""
    groups = [images] if end_images is None else [images, end_images]
    pixels = torch.cat([images_to_channels_first(g) for g in groups])
    with torch.no_grad(), on_device(handle.model, device, handle.resident_device, offload) as model:
        feats = model.encode_image(pixels.to(device), crop=crop, callback=progress).float().cpu()
    parts = feats.split([g.shape[0] for g in groups])
    return torch.cat([p.mean(dim=0, keepdim=True) for p in parts], dim=1) * strength


def resize_to(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B,3,H,W] -> [B,3,height,width], bicubic with antialiasing (when shrinking), clamped to 0..1."""
    if pixels.shape[-2:] == (height, width):
        return pixels
    return F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False,
                         antialias=True).clamp(0, 1)


def i2v_mask(num_frames: int, latent_h: int, latent_w: int, known_frames: int = 1,
             last_frame: bool = False) -> torch.Tensor:
    """[4, T, h, w]: 1 where a pixel frame is given (the first `known_frames`, and the last one for
    first/last-frame). Frame 0's mask is repeated 4x so the 1+4k pixel frames fold into 4 channels
    per latent frame (the official layout)."""
    mask = torch.zeros(num_frames, latent_h, latent_w)
    mask[:known_frames] = 1
    if last_frame:
        mask[-1] = 1
    mask = torch.cat([mask[:1].repeat(3, 1, 1), mask])          # (F + 3) frames
    return mask.view(-1, 4, latent_h, latent_w).transpose(0, 1).contiguous()


def _check_end_image(start_image: torch.Tensor, end_image: torch.Tensor | None) -> None:
    if end_image is None:
        return
    if end_image.dim() != 4 or tuple(end_image.shape[1:3]) != tuple(start_image.shape[1:3]):
        got = tuple(end_image.shape[1:3]) if end_image.dim() == 4 else tuple(end_image.shape)
        raise ValueError(f"The end image is {got[1] if len(got) > 1 else '?'}x{got[0]} (WxH) but the start image is "
                         f"{start_image.shape[2]}x{start_image.shape[1]}: give both frames the same size (resize or "
                         "crop the end image, e.g. with core's ImageScale node) so they frame the same shot.")


def _pixels(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The first image of an IMAGE batch as a [3, height, width] frame in -1..1."""
    return resize_to(images_to_channels_first(image[:1]), width, height)[0] * 2.0 - 1.0


def image_to_video_embeds(vae: WanVAEHandle, start_image: torch.Tensor, width: int, height: int, num_frames: int,
                          device: torch.device, noise_aug_strength: float = 0.0, clip: torch.Tensor | None = None,
                          negative_clip: torch.Tensor | None = None, offload: bool = True,
                          tiling: Tiling | None = None, progress: Progress | None = None,
                          end_image: torch.Tensor | None = None) -> WanImageEmbeds:
    """The conditioning of an image-to-video run. `width`, `height`, `num_frames` must already be valid.

    Wan 2.1 VAE: the start frame (and `end_image` as the last frame) among mid-grey frames,
    VAE-encoded and normalised, behind the 4-channel frame mask (I2V, FLF2V, A14B). Wan 2.2 VAE: the
    start frame alone, encoded as the clean first latent frame TI2V-5B keeps. Bad input raises before
    any encoding."""
    _check_end_image(start_image, end_image)
    if vae.vae.GENERATION == "2.2":
        if end_image is not None:
            raise ValueError("Wan 2.2 TI2V-5B conditions on the start frame only; disconnect end_image, or use the "
                             f"Wan 2.1 VAE ({VAE_FILES['2.1']}) with an FLF2V or I2V model for first/last frame.")
        return _ti2v_embeds(vae, start_image, width, height, num_frames, device, noise_aug_strength, offload,
                            tiling, progress)
    spatial = vae.vae.SPATIAL
    video = torch.zeros(1, 3, num_frames, height, width)
    video[:, :, 0] = _noised(_pixels(start_image, width, height), noise_aug_strength)
    if end_image is not None:
        video[:, :, -1] = _noised(_pixels(end_image, width, height), noise_aug_strength)
    with torch.no_grad(), on_device(vae.vae, device, vae.resident_device, offload) as model:
        latent = model.encode(video, callback=progress, tiling=tiling).cpu()
    mask = i2v_mask(num_frames, height // spatial, width // spatial, last_frame=end_image is not None)
    y = torch.cat([mask, normalize_latent(latent)[0]])
    return WanImageEmbeds(width, height, num_frames, y=y, clip=clip, negative_clip=negative_clip)


def _noised(pixels: torch.Tensor, strength: float) -> torch.Tensor:
    if strength <= 0:
        return pixels
    generator = torch.Generator().manual_seed(0)  # fixed: the same inputs give the same conditioning
    return pixels + strength * torch.randn(pixels.shape, generator=generator)


def _ti2v_embeds(vae: WanVAEHandle, start_image: torch.Tensor, width: int, height: int, num_frames: int,
                 device: torch.device, noise_aug_strength: float, offload: bool, tiling: Tiling | None,
                 progress: Progress | None) -> WanImageEmbeds:
    """TI2V-5B image-to-video (official `textimage2video`): the start frame encoded alone is the first
    latent frame, kept clean (mask 0) while the rest is denoised."""
    side = 2 * vae.vae.SPATIAL
    if width % side or height % side:
        raise ValueError(f"TI2V-5B with the Wan 2.2 VAE needs width and height multiples of {side} px; got "
                         f"{width}x{height}. Use e.g. {width // side * side}x{height // side * side}.")
    frame = _noised(_pixels(start_image, width, height), noise_aug_strength)[None, :, None]   # [1, 3, 1, H, W]
    with torch.no_grad(), on_device(vae.vae, device, vae.resident_device, offload) as model:
        latent = normalize_latent(model.encode(frame, callback=progress, tiling=tiling).cpu())[0]
    frames = (num_frames - 1) // 4 + 1
    h, w = latent.shape[2:]
    return WanImageEmbeds(width, height, num_frames, clean_latent=clean_latent_frames(latent, frames),
                          denoise_mask=first_frames_mask(frames, h, w))


def decode_latent(vae: WanVAEHandle, latent: torch.Tensor, device: torch.device, offload: bool = True,
                  tiling: Tiling | None = None, progress: Progress | None = None) -> torch.Tensor:
    """Raw latent [B,C,T,h,w] -> IMAGE [B·F, H, W, 3] in 0..1 (batch items one after another); C is 16
    for the Wan 2.1 VAE, 48 for the Wan 2.2 VAE, and must be the loaded VAE's.

    `progress(done, total)` counts the decode steps of the whole batch (latent frames, times tiles)."""
    channels = vae.vae.LATENT_CHANNELS
    if latent.dim() == 5 and latent.shape[1] == channels and 0 in latent.shape:
        raise WanInputError(f"Wan Decode got an empty video latent {tuple(latent.shape)} (no frames or no pixels); "
                            "connect the samples of a sampler run with at least one frame.")
    if latent.dim() != 5:
        raise WanInputError(f"Wan Decode needs a video latent [B, {channels}, T, h, w]; got {tuple(latent.shape)}. "
                         "An image latent [B, C, h, w] is not a Wan video latent.")
    if latent.shape[1] != channels:
        other = {16: "2.1", 48: "2.2"}.get(latent.shape[1])
        hint = (f"it is a Wan {other} latent: load {VAE_FILES[other]} in Wan VAE Loader for Wan Decode"
                if other else "it is not a Wan latent")
        raise WanInputError(f"Wan Decode: the latent has {latent.shape[1]} channels but the Wan {vae.vae.GENERATION} VAE "
                         f"decodes {channels}; {hint}.")
    frames = []
    batch = latent.shape[0]
    with torch.no_grad(), on_device(vae.vae, device, vae.resident_device, offload) as model:
        for index, item in enumerate(latent):
            item_progress = None if progress is None else \
                (lambda done, total, index=index: progress(index * total + done, batch * total))
            video = model.decode(item[None], callback=item_progress, tiling=tiling)[0]      # [3, F, H, W]
            frames.append(((video.float().cpu() + 1.0) * 0.5).clamp(0, 1).permute(1, 2, 3, 0))
    return torch.cat(frames)
