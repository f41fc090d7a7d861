"""Text and audio guidance of the speech-driven Wan models, each family's official formula.

Both families guide with up to three model passes; which passes run, and how they combine, is
decided by the two scales (1 means "no guidance of that kind" and skips its pass):

    text cfg ≠ 1, audio cfg ≠ 1   three passes, the families differ in the middle one:
        MultiTalk / InfiniteTalk:  c = (text, audio)  d = (no text, audio)  u = (no text, no audio)
                                   v = u + cfg·(c − d) + audio_cfg·(d − u)
        FantasyTalking:            c = (text, audio)  d = (text, no audio)  u = (no text, no audio)
                                   v = u + cfg·(d − u) + audio_cfg·(c − d)
    text cfg ≠ 1, audio cfg = 1   c and n = (no text, audio):     v = n + cfg·(c − n)
    text cfg = 1, audio cfg ≠ 1   c and d = (text, no audio):     v = d + audio_cfg·(c − d)
    both 1                        c alone.

"no text" is the negative prompt, "no audio" the conditioning's `null()` branch (MultiTalk: zero
features; FantasyTalking: audio scale 0). MultiTalk's text-only case is its three-pass formula
with audio_cfg 1, where u drops out; FantasyTalking's is its `audio_cfg_scale=None` path.
Each pass is a separate batch-1 forward: the branches differ in their audio, which the adapters
prepare per forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .guidance import combine

FAMILIES = ("multitalk", "fantasytalking")


@dataclass(frozen=True)
class GuidancePass:
    """One model evaluation: with the positive prompt (else the negative), with the audio (else null)."""

    text: bool
    audio: bool


COND = GuidancePass(True, True)
DROP_TEXT = GuidancePass(False, True)
DROP_AUDIO = GuidancePass(True, False)
UNCOND = GuidancePass(False, False)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"audio guidance knows the families {', '.join(FAMILIES)}, not '{family}'.")


def guidance_passes(family: str, cfg: float, audio_cfg: float) -> tuple[GuidancePass, ...]:
    """The passes one guided step runs, in order (see the module docstring)."""
    _check_family(family)
    text_on, audio_on = not math.isclose(cfg, 1.0), not math.isclose(audio_cfg, 1.0)
    if text_on and audio_on:
        return (COND, DROP_TEXT, UNCOND) if family == "multitalk" else (COND, DROP_AUDIO, UNCOND)
    if text_on:
        return COND, DROP_TEXT
    if audio_on:
        return COND, DROP_AUDIO
    return (COND,)


def combine_speech(family: str, preds: Sequence[torch.Tensor], cfg: float, audio_cfg: float,
                   zero_star: bool = False) -> torch.Tensor:
    """The guided velocity from the predictions of `guidance_passes(family, cfg, audio_cfg)`, in that
    order. CFG-Zero* applies to the two-pass cases (one guidance direction)."""
    passes = guidance_passes(family, cfg, audio_cfg)
    if len(preds) != len(passes):
        raise ValueError(f"{len(passes)} predictions expected for cfg {cfg}, audio_cfg {audio_cfg}, got {len(preds)}")
    if len(passes) == 1:
        return preds[0]
    if len(passes) == 2:
        scale = cfg if passes[1] == DROP_TEXT else audio_cfg
        return combine(preds[0], preds[1], scale, zero_star)
    cond, middle, uncond = preds
    if family == "multitalk":
        return uncond + cfg * (cond - middle) + audio_cfg * (middle - uncond)
    return uncond + cfg * (middle - uncond) + audio_cfg * (cond - middle)


def window_frames(window: Sequence[int]) -> tuple[int, int]:
    """(first pixel frame, pixel frames) the audio of a context window of latent frames covers.

    A window is sampled as a clip of its own, its first latent frame standing for one pixel frame:
    latent s (s ≥ 1) stands for pixel 4s, latent s + j for pixels 4(s + j) − 3 … 4(s + j); latent 0
    for pixel 0. So the clip's 1 + 4(n − 1) audio frames start at 4s."""
    start, n = window[0], len(window)
    if list(window) != list(range(start, start + n)):
        raise ValueError("audio conditioning follows the video frame by frame, so context windows must be runs of "
                         "consecutive frames: use the static_standard or uniform_standard schedule with "
                         "context_stride 4 or less (uniform_looped and dilated windows wrap or skip frames).")
    return 4 * start, 1 + 4 * (n - 1)
