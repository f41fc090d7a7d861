"""Streaming long speech video (MultiTalk / InfiniteTalk): a video of any length as a chain of clips.

    frames = stream_speech_video(handle, text, image, audio, settings, StreamSettings(num_frames=300),
                                 vae=vae, device=device)              # IMAGE [300, H, W, 3] in 0..1

Each clip is an ordinary image-to-video run of `image.num_frames` frames (81 official) on the audio
of its own frames. The first clip starts from the start image; every later clip starts with the
last `motion_frames` (25 official) decoded frames of the clip before it, and its audio window
starts there too: clip k+1 begins `clip − motion` frames after clip k. Overlap: the official loop
keeps the earlier clip's frames and drops the first `motion_frames` frames of every later clip
(no blending), so the video is clip 1 whole, then each later clip from frame `motion_frames` on.

How a later clip is conditioned (the two official modes):

- multitalk: the motion frames, VAE-encoded among grey frames, are its I2V conditioning `y` (mask
  1 on those frames); their first 1 + (motion − 1)/4 latent frames replace the noise at the start
  and after every step, noised to the current σ; CLIP tokens come from the last motion frame
  when a CLIP vision model is given (official), else from the start image.
- infinitetalk: `y` and the CLIP tokens stay those of the start image (the reference frame of
  every clip); the motion frames, VAE-encoded on their own, are held clean in the first latent
  frames (for the first clip: the start image's latent frame).

Length: exactly `num_frames` frames come out. The official loop always runs full clips and cuts
the last one on audio it pads by reflection; here the last clip is only as long as the frames
still missing (plus the motion frames, rounded up to 1 + 4k) and ends exactly at `num_frames`, so
nothing is generated past the end and no audio past it is needed (`clip_plan`): the audio embeds
must cover `num_frames` (a video shorter than one clip: the clip's 1 + 4k frames). FantasyTalking
has no official long-video mode and is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .audio_hooks import AudioConditioning
from .denoiser import SamplingExtras
from .encoders import WanClipVisionHandle, WanVAEHandle, decode_latent, encode_clip, i2v_mask, on_device
from .pipeline import (
    MAX_SEED,
    SamplerSettings,
    WanImageEmbeds,
    WanModelHandle,
    WanTextEmbeds,
    sample_video_full,
)
from .speech_sampling import MotionLatent
from .vae import normalize_latent

STREAM_MODES = ("multitalk", "infinitetalk")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class StreamSettings:
    """The long video the user asked for: its length, the frames clips share, the official mode."""

    num_frames: int
    motion_frames: int = 25
    mode: str = "multitalk"

    def __post_init__(self):
        if self.mode not in STREAM_MODES:
            raise ValueError(f"streaming mode must be one of {', '.join(STREAM_MODES)}, got '{self.mode}'.")
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"num_frames must be a whole number of frames, 1 or more; got {self.num_frames!r}.")
        m = self.motion_frames
        if isinstance(m, bool) or not isinstance(m, int) or m < 1 or (m - 1) % 4:
            raise ValueError(f"motion_frames must be 1 + 4k (1, 5, 9 … 25 official), got {m!r}: the motion frames "
                             "become whole latent frames of the next clip.")


@dataclass(frozen=True)
class Clip:
    """Pixel frames [start, start + length) of the video; its frames from `keep` on are new (the ones
    before are the previous clips' and are dropped); it continues from its first `motion` frames."""

    start: int
    length: int
    keep: int
    motion: int = 0


def _up_to_wan_length(n: int) -> int:
    """The smallest 1 + 4k ≥ n."""
    return 1 + 4 * max(0, -(-(n - 1) // 4))


def clip_plan(total: int, clip_frames: int, motion: int) -> list[Clip]:
    """The clips covering `total` frames: full clips of `clip_frames`, each later one starting `motion`
    frames before the end of the previous (official); the last one only as long as the missing
    frames need (plus the motion frames, 1 + 4k in all) and placed to end exactly at `total`, so it
    starts up to 3 frames earlier and drops those too."""
    if clip_frames <= motion:
        raise ValueError(f"motion_frames ({motion}) must be fewer than the clip's {clip_frames} frames (the image "
                         "embeds' num_frames): each clip must add new frames.")
    clips = [Clip(0, min(clip_frames, _up_to_wan_length(total)), 0)]
    produced = clips[0].length
    while produced < total:
        length = _up_to_wan_length(motion + total - produced)
        start = produced - motion if length > clip_frames else total - length
        length = min(length, clip_frames)
        clips.append(Clip(start, length, produced - start, motion))
        produced = start + length
    return clips


def _slice_embeds(image: WanImageEmbeds, length: int) -> WanImageEmbeds:
    """The start-image conditioning of a clip of `length` frames (the first latent frames of the
    full clip's: the VAE is causal, so a shorter grey tail encodes to the same first latents)."""
    latent_frames = (length - 1) // 4 + 1
    return replace(image, num_frames=length, y=image.y[:, :latent_frames].clone())


def _encode(vae: WanVAEHandle, pixels: torch.Tensor, device: torch.device, offload: bool) -> torch.Tensor:
    """[3, F, H, W] in -1..1 -> normalised latent [16, 1 + (F − 1)/4, h, w]."""
    with torch.no_grad(), on_device(vae.vae, device, vae.resident_device, offload) as model:
        return normalize_latent(model.encode(pixels[None]).cpu())[0]


def _next_embeds(mode: str, image: WanImageEmbeds, clip: Clip, previous: Clip, last: torch.Tensor,
                 vae: WanVAEHandle, clip_vision: WanClipVisionHandle | None, device: torch.device,
                 offload: bool) -> WanImageEmbeds:
    """The conditioning of a later clip from the previous clip's decoded frames `last` (IMAGE, 0..1):
    its motion frames are the previous clip's frames at the clip's first frames (the previous clip's
    last `motion` frames, as officially, except for a last clip placed to end on the video's end)."""
    offset = clip.start - previous.start
    frames = last[offset:offset + clip.motion]
    motion = frames.permute(3, 0, 1, 2).float() * 2.0 - 1.0                    # [3, M, H, W] in -1..1
    if mode == "infinitetalk":
        latent = _encode(vae, motion, device, offload)
        return replace(_slice_embeds(image, clip.length), motion=MotionLatent(latent, "clean"))
    video = torch.zeros(3, clip.length, *motion.shape[2:])
    video[:, :clip.motion] = motion
    latent = _encode(vae, video, device, offload)
    mask = i2v_mask(clip.length, latent.shape[2], latent.shape[3], known_frames=clip.motion)
    tokens, negative = image.clip, image.negative_clip
    if clip_vision is not None:
        tokens, negative = encode_clip(clip_vision, frames[-1:], device, crop=False, offload=offload), None
    return WanImageEmbeds(image.width, image.height, clip.length, y=torch.cat([mask, latent]), clip=tokens,
                          negative_clip=negative,
                          motion=MotionLatent(latent[:, :(clip.motion - 1) // 4 + 1].clone(), "noised"))


def check_stream(handle: WanModelHandle, image: WanImageEmbeds, audio: AudioConditioning | None,
                 stream: StreamSettings) -> list[Clip]:
    """Everything a long run needs, checked before the first clip; the clip plan."""
    if audio is None:
        raise ValueError("Streaming speech video needs audio embeds (from the MultiTalk embeds node).")
    if audio.family != "multitalk":
        raise ValueError(f"Streaming long video is the MultiTalk / InfiniteTalk way; {audio.family} has no official "
                         "long-video mode. Sample it with the Wan Sampler (up to the clip length it was trained on).")
    if image.y is None or not handle.config.has_image_input:
        raise ValueError("Streaming speech video continues image-to-video clips: load the MultiTalk or InfiniteTalk "
                         "model on a Wan 2.1 I2V model and connect Wan Image to Video Encode (start image + CLIP).")
    clips = clip_plan(stream.num_frames, image.num_frames, stream.motion_frames)
    needed = max(c.start + c.length for c in clips)
    if audio.num_frames < needed:
        raise ValueError(f"The audio embeds cover {audio.num_frames} frames, but {stream.num_frames} frames in clips "
                         f"of {image.num_frames} need audio for {needed}: raise the embeds node's num_frames to "
                         f"{needed} (with audio that long) or ask for fewer frames.")
    return clips


def stream_speech_video(handle: WanModelHandle, text: WanTextEmbeds, image: WanImageEmbeds,
                        audio: AudioConditioning, settings: SamplerSettings, stream: StreamSettings, *,
                        vae: WanVAEHandle, device: torch.device, clip_vision: WanClipVisionHandle | None = None,
                        extras: SamplingExtras | None = None, force_offload: bool = True,
                        progress: Progress | None = None, check_interrupt: Callable[[], None] | None = None,
                        on_clip: Callable[[int, Clip, torch.Tensor], None] | None = None) -> torch.Tensor:
    """The whole video as IMAGE [num_frames, H, W, 3] in 0..1; see the module docstring.

    `progress(done, total)` counts sampling steps over all clips; `on_clip(index, clip, frames)`
    sees each decoded clip (all its frames) before its overlap is dropped."""
    clips = check_stream(handle, image, audio, stream)
    extras = extras or SamplingExtras()
    per_clip = (settings.end_step if settings.end_step >= 0 else settings.steps) - settings.start_step
    kept: list[torch.Tensor] = []
    last: torch.Tensor | None = None
    for index, clip in enumerate(clips):
        if check_interrupt is not None:
            check_interrupt()
        final = index == len(clips) - 1
        if index == 0:
            embeds = _slice_embeds(image, clip.length)
            if stream.mode == "infinitetalk":
                embeds = replace(embeds, motion=MotionLatent(image.y[4:, :1].clone(), "clean"))
        else:
            embeds = _next_embeds(stream.mode, image, clip, clips[index - 1], last, vae, clip_vision, device,
                                  force_offload)
        clip_progress = None if progress is None else \
            (lambda done, total, base=index * per_clip: progress(base + done, len(clips) * per_clip))
        seed = (int(settings.seed) + index) % (MAX_SEED + 1)
        result = sample_video_full(handle, text, embeds, replace(settings, seed=seed),
                                   device=device, extras=replace(extras, audio=audio.frames(clip.start, clip.length)),
                                   force_offload=force_offload or final, progress=clip_progress,
                                   check_interrupt=check_interrupt)
        last = decode_latent(vae, result.latent, device, offload=force_offload)
        if on_clip is not None:
            on_clip(index, clip, last)
        kept.append(last[clip.keep:])
    return torch.cat(kept)[:stream.num_frames]
