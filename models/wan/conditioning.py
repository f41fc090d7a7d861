"""What the Wan conditioning nodes do: VACE control inputs (control video, mask, reference images)
turned into the VACE context the sampler passes to a VACE model; the Fun Control conditioning
(control and start-image latents, the reference image of Fun V1.1 / Wan 2.2 Fun Control, see
models/wan/fun.py); the Fun InP frames; Phantom's subject latents.

Frames arrive as ComfyUI IMAGE [F, H, W, C] in 0..1 and masks as MASK [F, H, W]; the VAE sees
-1..1. Sizes are checked, not guessed: a control video or mask of another aspect ratio than the
output, or with fewer frames than the video, is refused with what to change, because silently
cropping or padding a control signal moves or freezes what it controls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from .encoders import (
    WanVAEHandle,
    i2v_mask,
    image_to_video_embeds,
    images_to_channels_first,
    on_device,
    resize_to,
)
from .pipeline import WanImageEmbeds
from .tiling import Tiling
from .vace import VaceInput, build_context, check_chain, split_by_mask
from .vae import latent_frames, normalize_latent

log = logging.getLogger("slipstream.wan")

Progress = Callable[[int, int], None]
ASPECT_TOLERANCE = 0.01


def _check_aspect(what: str, size: tuple[int, int], width: int, height: int) -> None:
    h, w = size
    if abs(w / h - width / height) > ASPECT_TOLERANCE * (width / height):
        raise ValueError(f"{what} is {w}x{h} but the video is {width}x{height} (another aspect ratio). Set width "
                         f"and height to the same shape as {what} (e.g. {width}x{round(width * h / w / 16) * 16}), "
                         "or crop it to the video's shape first; it is not cropped for you, so that what it "
                         "controls stays in place.")


def control_frames(video: torch.Tensor, num_frames: int, width: int, height: int) -> torch.Tensor:
    """IMAGE [F, H, W, C] -> [3, num_frames, height, width] in -1..1 (the first num_frames frames)."""
    if video.dim() != 4:
        raise ValueError(f"control_video must be an IMAGE batch [frames, H, W, C], got shape {tuple(video.shape)}")
    if video.shape[0] < num_frames:
        fit = 1 + 4 * ((video.shape[0] - 1) // 4)
        raise ValueError(f"control_video has {video.shape[0]} frames but num_frames is {num_frames}: set num_frames "
                         f"to {fit} (or fewer), or give a control video with at least {num_frames} frames.")
    if video.shape[0] > num_frames:
        log.info("Wan VACE: using the first %d of the control video's %d frames", num_frames, video.shape[0])
    _check_aspect("control_video", tuple(video.shape[1:3]), width, height)
    pixels = resize_to(images_to_channels_first(video[:num_frames]), width, height)
    return (pixels * 2.0 - 1.0).transpose(0, 1)


def control_mask(mask: torch.Tensor, num_frames: int, width: int, height: int,
                 video_size: tuple[int, int] | None) -> torch.Tensor:
    """MASK [F, H, W] (or one frame for every frame) -> a 0/1 mask [num_frames, height, width]; 1 marks
    what the model generates (reactive), 0 what it keeps (inactive), binarised at 0.5 as officially."""
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise ValueError(f"control_masks must be a MASK [frames, H, W], got shape {tuple(mask.shape)}")
    if video_size is not None and tuple(mask.shape[1:]) != video_size:
        raise ValueError(f"control_masks are {mask.shape[2]}x{mask.shape[1]} but the control video is "
                         f"{video_size[1]}x{video_size[0]}: make the masks from the same frames (same size).")
    if mask.shape[0] != 1 and mask.shape[0] < num_frames:
        raise ValueError(f"control_masks have {mask.shape[0]} frames but the video has {num_frames}: give one mask "
                         "per frame (at least num_frames), or a single mask for all frames.")
    _check_aspect("control_masks", tuple(mask.shape[1:]), width, height)
    mask = mask[:num_frames].float()[:, None]
    if tuple(mask.shape[-2:]) != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
    return (mask[:, 0] > 0.5).float().expand(num_frames, height, width)


def reference_frames(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE [R, H, W, C] -> [R, 3, height, width] in -1..1: each image scaled to fit, centred on a
    white canvas (the official VACE preprocessing)."""
    pixels = images_to_channels_first(images) * 2.0 - 1.0
    h, w = pixels.shape[-2:]
    scale = min(height / h, width / w)
    nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
    canvas = torch.ones(pixels.shape[0], 3, height, width)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, :, top:top + nh, left:left + nw] = F.interpolate(pixels, size=(nh, nw), mode="bilinear",
                                                               align_corners=False)
    return canvas


def vace_embeds(vae: WanVAEHandle, width: int, height: int, num_frames: int, device: torch.device,
                strength: float = 1.0, control_video: torch.Tensor | None = None,
                control_masks: torch.Tensor | None = None, reference_images: torch.Tensor | None = None,
                previous: WanImageEmbeds | None = None, offload: bool = True, tiling: Tiling | None = None,
                progress: Progress | None = None) -> WanImageEmbeds:
    """The embeds of a VACE run: `previous` (a chain) plus one VACE input built from these frames.
    `width`, `height`, `num_frames` must already be valid Wan sizes. Everything is checked before
    the VAE runs."""
    if previous is not None:
        if (previous.width, previous.height, previous.num_frames) != (width, height, num_frames):
            raise ValueError(f"prev_embeds are {previous.width}x{previous.height}, {previous.num_frames} frames but "
                             f"this encode is {width}x{height}, {num_frames}: chained VACE encodes must use the same "
                             "width, height and num_frames.")
        if previous.y is not None:
            raise ValueError("prev_embeds carry an image-to-video start image; chain only Wan VACE Encode nodes.")
    if control_video is not None:
        video = control_frames(control_video, num_frames, width, height)
    else:
        video = torch.zeros(3, num_frames, height, width)          # grey: nothing to follow
    if control_masks is not None:
        size = None if control_video is None else tuple(control_video.shape[1:3])
        mask = control_mask(control_masks, num_frames, width, height, size)
    else:
        mask = torch.ones(num_frames, height, width)               # generate everything
    refs = None if reference_images is None else reference_frames(reference_images, width, height)
    inactive, reactive = split_by_mask(video, mask)
    t = latent_frames(num_frames)
    total = 2 * t + (0 if refs is None else refs.shape[0])

    def report(offset: int, span: int) -> Progress | None:     # one VAE call's share of the bar
        return None if progress is None else (lambda d, n: progress(offset + round(d * span / max(n, 1)), total))

    with torch.no_grad(), on_device(vae.vae, device, vae.resident_device, offload) as model:
        inactive_latent, reactive_latent = (
            normalize_latent(model.encode(part[None], callback=report(i * t, t), tiling=tiling).cpu())[0]
            for i, part in enumerate((inactive, reactive)))
        ref_latent = None
        if refs is not None:
            ref_latent = torch.cat([normalize_latent(model.encode(
                ref[None, :, None], callback=report(2 * t + r, 1), tiling=tiling).cpu())[0]
                for r, ref in enumerate(refs)], dim=1)
    context = build_context(inactive_latent, reactive_latent, mask, ref_latent)
    new = VaceInput(context, float(strength), 0 if refs is None else refs.shape[0])
    chain = (previous.vace if previous is not None else ()) + (new,)
    check_chain(chain)
    base = previous if previous is not None else WanImageEmbeds(width, height, num_frames)
    return replace(base, vace=chain)


def _encode_frames(model, frames: torch.Tensor, tiling: Tiling | None, progress: Progress | None) -> torch.Tensor:
    """[3, F, H, W] in -1..1 -> normalised latent [16, T, h, w] (CPU)."""
    return normalize_latent(model.encode(frames[None], callback=progress, tiling=tiling).cpu())[0]


def _fill(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[1, 3, H, W] -> [1, 3, height, width]: centre-cropped to the video's aspect ratio, then resized
    (a reference shows appearance, so it is cropped rather than stretched)."""
    h, w = pixels.shape[-2:]
    if w * height > h * width:                      # too wide: crop the sides
        keep = max(1, round(h * width / height))
        pixels = pixels[..., (w - keep) // 2:(w - keep) // 2 + keep]
    elif w * height < h * width:                    # too tall: crop top and bottom
        keep = max(1, round(w * height / width))
        pixels = pixels[..., (h - keep) // 2:(h - keep) // 2 + keep, :]
    return resize_to(pixels, width, height)


def encode_reference(model, ref_image: torch.Tensor, width: int, height: int,
                     tiling: Tiling | None = None) -> torch.Tensor:
    """The first image of an IMAGE batch as a normalised reference latent frame [16, h, w]."""
    if ref_image.dim() != 4 or ref_image.shape[0] == 0 or ref_image.shape[-1] < 3:
        raise ValueError(f"ref_image must be an IMAGE batch [N, H, W, 3] with at least one image, got shape "
                         f"{tuple(ref_image.shape)}")
    pixels = _fill(images_to_channels_first(ref_image[:1]), width, height) * 2.0 - 1.0
    return normalize_latent(model.encode(pixels[:, :, None], tiling=tiling).cpu())[0, :, 0]


def fun_control_embeds(vae: WanVAEHandle, width: int, height: int, num_frames: int, device: torch.device,
                       control_video: torch.Tensor | None = None, start_image: torch.Tensor | None = None,
                       clip: torch.Tensor | None = None, offload: bool = True, tiling: Tiling | None = None,
                       progress: Progress | None = None, ref_image: torch.Tensor | None = None) -> WanImageEmbeds:
    """Wan Fun Control: y = [control latent (16), start-image latent (16)] and the start frame's mask
    beside it (`fun_mask`, which Wan 2.2 Fun Control takes between the two; models/wan/fun.py), as
    core's WanFunControlToVideo / Wan22FunControlToVideo. A missing control video or start image is
    a zero latent; without CLIP features the sampler uses zeros (VideoX-Fun's choice when there is
    no start image). `ref_image` (Fun V1.1, Wan 2.2 Fun Control) becomes the reference latent frame."""
    if vae.vae.GENERATION != "2.1":
        raise ValueError("Wan Fun Control Encode needs the Wan 2.1 VAE (wan_2.1_vae.safetensors): every Fun Control "
                         "model (Wan 2.1 Fun, Fun V1.1, Wan 2.2 Fun A14B) works in its 16-channel latent.")
    t = latent_frames(num_frames)
    h, w = height // 8, width // 8
    control = torch.zeros(16, t, h, w)
    image = torch.zeros(16, t, h, w)
    video = None if control_video is None else control_frames(control_video, num_frames, width, height)
    reference = None
    with torch.no_grad(), on_device(vae.vae, device, vae.resident_device, offload) as model:
        if video is not None:
            control = _encode_frames(model, video, tiling, progress)
        if start_image is not None:
            first = resize_to(images_to_channels_first(start_image[:1]), width, height) * 2.0 - 1.0
            image[:, :1] = _encode_frames(model, first.transpose(0, 1), tiling, None)
        if ref_image is not None:
            reference = encode_reference(model, ref_image, width, height, tiling)
    mask = i2v_mask(num_frames, h, w, known_frames=1 if start_image is not None else 0)
    return WanImageEmbeds(width, height, num_frames, y=torch.cat([control, image]), clip=clip, fun_mask=mask,
                          reference=reference)


def fun_inpaint_embeds(vae: WanVAEHandle, width: int, height: int, num_frames: int, device: torch.device,
                       start_image: torch.Tensor | None = None, end_image: torch.Tensor | None = None,
                       clip: torch.Tensor | None = None, offload: bool = True, tiling: Tiling | None = None,
                       progress: Progress | None = None) -> WanImageEmbeds:
    """Fun InP (and any I2V-layout model): start and/or end image as given frames among grey ones,
    behind the 4-channel mask, as core's WanFunInpaintToVideo. Neither image: nothing is given (a
    zero mask over grey frames), which Fun InP models take as text-to-video."""
    if vae.vae.GENERATION != "2.1":
        raise ValueError("Wan Fun InP Encode needs the Wan 2.1 VAE (16 latent channels; Fun InP 1.3B/14B and Wan "
                         "2.2 Fun A14B InP use it); for TI2V-5B use Wan Image to Video Encode.")
    if start_image is not None:
        return image_to_video_embeds(vae, start_image, width, height, num_frames, device, clip=clip,
                                     offload=offload, tiling=tiling, progress=progress, end_image=end_image)
    video = torch.zeros(1, 3, num_frames, height, width)
    if end_image is not None:
        if end_image.dim() != 4 or end_image.shape[0] == 0:
            raise ValueError(f"end_image must be an IMAGE batch [N, H, W, 3], got shape {tuple(end_image.shape)}")
        video[0, :, -1] = resize_to(images_to_channels_first(end_image[:1]), width, height)[0] * 2.0 - 1.0
    with torch.no_grad(), on_device(vae.vae, device, vae.resident_device, offload) as model:
        latent = normalize_latent(model.encode(video, callback=progress, tiling=tiling).cpu())[0]
    mask = i2v_mask(num_frames, height // 8, width // 8, known_frames=0, last_frame=end_image is not None)
    return WanImageEmbeds(width, height, num_frames, y=torch.cat([mask, latent]), clip=clip)


def phantom_embeds(vae: WanVAEHandle, width: int, height: int, num_frames: int, device: torch.device,
                   images: torch.Tensor, offload: bool = True, tiling: Tiling | None = None,
                   progress: Progress | None = None, subject_cfg: float = 0.0) -> WanImageEmbeds:
    """Phantom subject-to-video: each subject image fitted on a white canvas of the video's size and
    encoded as its own latent frame; the sampler appends them after the video's frames. `subject_cfg`
    > 0 turns on Phantom's separate subject guidance (models/wan/guidance.py, phantom_combine)."""
    if not math.isfinite(subject_cfg) or subject_cfg < 0:
        raise ValueError(f"subject_cfg must be a finite number >= 0 (0 = one cfg for text and subject), got "
                         f"{subject_cfg!r}.")
    if images is None or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError("Wan Phantom Subject Encode needs at least one subject image (an IMAGE batch).")
    refs = reference_frames(images, width, height)
    with torch.no_grad(), on_device(vae.vae, device, vae.resident_device, offload) as model:
        latents = []
        for i, ref in enumerate(refs):
            latents.append(_encode_frames(model, ref[:, None], tiling, None))
            if progress is not None:
                progress(i + 1, refs.shape[0])
    return WanImageEmbeds(width, height, num_frames, subject=torch.cat(latents, dim=1), subject_cfg=float(subject_cfg))
