"""What the Wan sampler does for speech models: check and cut the audio conditioning to the video,
and hold a streaming clip's motion frames in place.

Audio: the conditioning must cover at least the video's frames (an audio shorter than the video is
refused, naming both lengths; lengthen the audio embeds' num_frames or shorten the video); a longer
one is cut to the video's first frames with `frames(0, n)`. Context windows ask for their own
frames, so they must be runs of consecutive frames (no looped or dilated schedules).

Motion frames are the latent frames a streaming clip shares with the clip before it. A streaming clip starts where the previous one ended: its first latent frames are the (VAE-encoded)
last frames of the previous clip. Two official ways keep them in place while the clip is sampled:

- MultiTalk (`noised`): at the start and after every step the motion latents replace the first
  latent frames, noised to the σ the latent is at: (1 − σ)·motion + σ·fresh noise.
- InfiniteTalk (`clean`): they replace the first latent frames as they are, before every step
  and after it (the official loop also noises them first, then overwrites that with the clean ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .audio_hooks import check_conditioning
from .clean_frames import impose_clean

if TYPE_CHECKING:
    from .context import ContextOptions
    from .denoiser import SamplingExtras
    from .pipeline import WanImageEmbeds, WanModelHandle

MOTION_MODES = ("noised", "clean")


@dataclass(frozen=True)
class MotionLatent:
    """[16, T_m, h, w] normalised latents of the clip's first T_m latent frames, and how they are held."""

    latent: torch.Tensor
    mode: str = "noised"

    def __post_init__(self):
        if self.mode not in MOTION_MODES:
            raise ValueError(f"motion mode must be one of {', '.join(MOTION_MODES)}, got '{self.mode}'")
        if self.latent.dim() != 4:
            raise ValueError(f"motion latent must be [C, T, h, w], got {tuple(self.latent.shape)}")

    @property
    def frames(self) -> int:
        return self.latent.shape[1]


def impose_motion(x: torch.Tensor, motion: MotionLatent | None, sigma: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """x [B, C, T, h, w] with its first latent frames set to the motion latents at noise level `sigma`."""
    if motion is None:
        return x
    m = motion.latent.to(device=x.device, dtype=x.dtype)
    if tuple(m.shape[0:1] + m.shape[2:]) != (x.shape[1], *x.shape[3:]) or m.shape[1] > x.shape[2]:
        raise ValueError(f"motion latent {tuple(m.shape)} does not fit the clip's latent {tuple(x.shape)}")
    if motion.mode == "noised" and sigma > 0:
        noise = torch.randn(m.shape, generator=generator).to(x.device, x.dtype)
        m = (1.0 - sigma) * m + sigma * noise
    out = x.clone()
    out[:, :, :m.shape[1]] = m
    return out


def hold_given(x: torch.Tensor, image: WanImageEmbeds, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """The latent with every given part held: TI2V's clean frames and a streaming clip's motion frames."""
    return impose_motion(impose_clean(x, image.clean_latent, image.denoise_mask), image.motion, float(sigma), generator)


def speech_extras(handle: WanModelHandle, image: WanImageEmbeds, extras: SamplingExtras,
                  context: ContextOptions | None) -> SamplingExtras:
    """The extras with the audio checked against the model and cut to the video (see the module docstring)."""
    audio = extras.audio
    if not isinstance(extras.audio_cfg, (int, float)) or not math.isfinite(extras.audio_cfg) or extras.audio_cfg < 0:
        raise ValueError(f"audio_cfg must be a finite number >= 0, got {extras.audio_cfg!r}.")
    if audio is None:
        return extras
    check_conditioning(handle.dit.audio_adapter, audio, handle.name)
    frames = image.num_frames
    if audio.num_frames < frames:
        raise ValueError(f"The audio embeds cover {audio.num_frames} video frames but the video has {frames}: set the "
                         f"embeds node's num_frames to at least {frames} (with audio that long), or make the video "
                         f"{audio.num_frames} frames or fewer.")
    if context is not None and (context.schedule == "uniform_looped" or context.latent()[1] > 1):
        raise ValueError("Context windows with audio must be runs of consecutive frames: use the static_standard or "
                         "uniform_standard schedule with context_stride 4 or less (looped windows wrap around and "
                         "dilated ones skip frames, which the speech features cannot follow).")
    if audio.num_frames > frames:
        audio = audio.frames(0, frames)
    return replace(extras, audio=audio)
