"""What the sampler needs for Wan Fun (VideoX-Fun) and Phantom: the reference image of Fun V1.1 /
Wan 2.2 Fun Control models, the mask channels Wan 2.2 Fun Control adds to the control conditioning,
and the checks of what only some models take (reference images, Phantom subjects and subject_cfg).

Layouts (the `y` channels beside the 16 noise channels, all latents normalised):
  Wan 2.1 Fun Control (V1.0 and V1.1, in_dim 48): [control 16, start image 16]
  Wan 2.2 Fun A14B Control (in_dim 52):           [control 16, mask 4, start image 16]
  Fun InP (Wan 2.1 1.3B/14B, Wan 2.2 A14B, 36):   [mask 4, start/end image 16] (the I2V layout)
The mask is 1 on given pixel frames (the start image), folded 4 per latent frame as for I2V.
Wan Fun Control Encode cannot know which model it feeds, so its embeds carry [control, start] in
`y` and the mask beside it (`fun_mask`); `for_model` puts the mask in where the model has room
for it, as ComfyUI's model does with its concat mask.

The encoding itself (reference image, Fun InP frames, the control mask) is in
models/wan/conditioning.py; this module holds what the sampler needs.

The reference adapter (`ref_conv`, a Conv2d with the patch embedding's 2x2 stride) turns one
reference-image latent frame [16, h, w] into h/2·w/2 tokens placed in front of the video's tokens;
the RoPE grid gains one leading frame (the reference is frame 0, the video frames 1..F) and the
prediction drops those tokens again (models/wan/dit.py). Without a reference image the model gets
a zero latent, as the VideoX-Fun pipelines do (ComfyUI instead leaves the reference tokens out);
a Fun model was trained with the reference frame always present, so we keep it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .config import WanDiTConfig

if TYPE_CHECKING:
    from .pipeline import WanImageEmbeds

LATENT_CHANNELS = 16     # the Wan 2.1 VAE's latent, which every Fun Control model works in


def for_model(config: WanDiTConfig, image: WanImageEmbeds) -> WanImageEmbeds:
    """The embeds in the layout this model takes: Fun Control's mask channels go between the control
    and the start-image latents when the model has room for them (Wan 2.2 Fun Control), and are
    dropped when it has not (Wan 2.1 Fun Control). Idempotent."""
    if image.fun_mask is None or image.y is None:
        return image
    y = image.y
    if config.cond_channels == y.shape[0] + image.fun_mask.shape[0]:
        y = torch.cat([y[:LATENT_CHANNELS], image.fun_mask.to(y.dtype), y[LATENT_CHANNELS:]])
    return replace(image, y=y, fun_mask=None)


def checked_for_model(config: WanDiTConfig, name: str, image: WanImageEmbeds) -> WanImageEmbeds:
    """`for_model(config, image)`, after checking what only some models take (reference images,
    subject guidance), with clear errors."""
    if image.reference is not None:
        if not config.has_ref_conv:
            raise ValueError(f"The image embeds carry a reference image (ref_image of Wan Fun Control Encode) but "
                             f"{name} ({config.variant}) has no reference adapter ('ref_conv'): load a Wan 2.1 Fun "
                             "V1.1 Control or Wan 2.2 Fun A14B Control model, or disconnect ref_image.")
        want = (config.ref_in_dim, image.height // 8, image.width // 8)
        if tuple(image.reference.shape) != want:
            raise ValueError(f"The reference latent is {tuple(image.reference.shape)} but {name} takes {want} for a "
                             f"{image.width}x{image.height} video: encode it with the Wan 2.1 VAE at the video's size.")
    if image.subject is not None and (image.vace or config.has_image_input or config.model_type == "ti2v"):
        raise ValueError("Phantom subject images go with a text-to-video (Phantom) model and no other conditioning: "
                         "load the Phantom checkpoint and connect Wan Phantom Subject Encode alone.")
    if image.subject_cfg and image.subject is None:
        raise ValueError("subject_cfg (Phantom's subject guidance) needs Phantom subject frames: it is set by Wan "
                         "Phantom Subject Encode, whose embeds go with a Phantom model.")
    return for_model(config, image)


def reference_latent(config: WanDiTConfig, image: WanImageEmbeds) -> torch.Tensor | None:
    """[C, h, w] the reference frame a model with `ref_conv` sees: the image's, or zeros without one."""
    if not config.has_ref_conv:
        return None
    if image.reference is not None:
        return image.reference
    return torch.zeros(config.ref_in_dim, image.height // 8, image.width // 8)
