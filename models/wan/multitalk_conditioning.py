"""MultiTalk / InfiniteTalk speech features for a run of video frames, and how they are built.

The official pipeline encodes each speaker's speech to one feature row per video frame (wav2vec2,
every hidden state but the first: [T, 12, 768] at 25 fps), then gives every video frame the rows of
its 5 neighbouring frames (offsets -2..2, clamped at the ends of the audio): [T, 5, 12, 768]. The
windows are built once over the whole audio, so slicing them later (`frames`, streaming clips,
context windows) keeps each frame's real neighbours even at the slice's edges.

Two speakers also need their places in the picture: `regions` [3, H, W] holds speaker 1, speaker 2
and the background (1 where neither speaker is), at the start image's resolution; the adapter
scales them to the latent token grid the way the official pipeline does (nearest, twice).

Drop-audio guidance (`null`) is what the official multi-guidance feeds: zeros of the window shape
for a single speaker (`zeros_like(audio)[-1:]`), so with two speakers the no-audio pass runs the
one-speaker path, without label RoPE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .errors import WanInputError

AUDIO_WINDOW = 5              # neighbouring video frames per frame (official audio_window)
FAMILY = "multitalk"          # MultiTalk and InfiniteTalk share the architecture and the features
FACE_SCALE = 0.05             # official margin of the left/right placement boxes


@dataclass(frozen=True, eq=False)
class MultiTalkConditioning:
    """Windowed speech features of one or two speakers (audio_hooks.AudioConditioning).

    features: [speakers, num_frames, 5, layers, channels] (fp32, CPU); regions: [3, H, W] 0/1 masks
    (speaker 1, speaker 2, background) for two speakers, None for one; audio_scale multiplies the
    audio cross-attention's output in every block (1 = the official model).
    """

    features: torch.Tensor
    regions: torch.Tensor | None = None
    audio_scale: float = 1.0
    family: str = FAMILY

    def __post_init__(self) -> None:
        f = self.features
        if f.dim() != 5 or f.shape[2] != AUDIO_WINDOW or f.shape[1] < 1:
            raise WanInputError(f"MultiTalk features must be [speakers, frames, {AUDIO_WINDOW}, layers, channels] "
                             f"(windows of {AUDIO_WINDOW} neighbouring frames), got {tuple(f.shape)}.")
        if f.shape[0] not in (1, 2):
            raise WanInputError(f"MultiTalk takes one or two speakers, got {f.shape[0]}.")
        if f.shape[0] == 2 and self.regions is None:
            raise WanInputError("two speakers need their places in the picture: give a mask per speaker, or a "
                             "left/right or bounding-box placement.")
        if self.regions is not None and (self.regions.dim() != 3 or self.regions.shape[0] != 3):
            raise WanInputError(f"regions must be [3, H, W] (speaker 1, speaker 2, background), got "
                             f"{tuple(self.regions.shape)}.")
        if not math.isfinite(self.audio_scale):
            raise WanInputError(f"audio_scale must be a finite number, got {self.audio_scale}.")

    @property
    def num_frames(self) -> int:
        return int(self.features.shape[1])

    @property
    def speakers(self) -> int:
        return int(self.features.shape[0])

    def null(self) -> MultiTalkConditioning:
        """Zeros of one speaker's window shape (the official drop-audio input); costs no memory."""
        zeros = torch.zeros((), dtype=self.features.dtype).expand(1, *self.features.shape[1:])
        return MultiTalkConditioning(zeros, None, self.audio_scale)

    def frames(self, start: int, count: int) -> MultiTalkConditioning:
        """The windows of video frames [start, start + count).

        The slice's first frame is projected as a clip's first frame (the projector's 5-row path), as
        every official streaming clip starts. For latent frames [s, s + n) of a longer latent use
        frames(4s, 4n - 3): latent frame s > 0 ends on video frame 4s, and every later latent frame then
        takes exactly its own 4 video frames (s = 0 gives frames(0, 4n - 3), the whole clip)."""
        if start < 0 or count < 1 or start + count > self.num_frames:
            raise WanInputError(f"frames [{start}, {start + count}) are outside the {self.num_frames} video frames "
                             "the audio features cover.")
        return replace(self, features=self.features[:, start:start + count])


def audio_windows(features: torch.Tensor, num_frames: int, start: int = 0) -> torch.Tensor:
    """[T, layers, channels] per-frame features -> [num_frames, 5, layers, channels]: for each video
    frame start..start+num_frames-1 the rows of frames -2..+2 around it, clamped to the audio."""
    if features.dim() != 3 or features.shape[0] < 1:
        raise WanInputError(f"per-frame speech features must be [frames, layers, channels], got {tuple(features.shape)}")
    half = AUDIO_WINDOW // 2
    centres = torch.arange(start, start + num_frames)[:, None] + torch.arange(-half, half + 1)[None]
    return features[centres.clamp(0, features.shape[0] - 1)]


def regions_from_masks(mask_1: torch.Tensor, mask_2: torch.Tensor) -> torch.Tensor:
    """[3, H, W] regions from two [H, W] speaker masks (>0.5 counts as inside); background = neither."""
    if mask_1.shape != mask_2.shape or mask_1.dim() != 2:
        raise WanInputError(f"the two speaker masks must be [H, W] of one size, got {tuple(mask_1.shape)} and "
                         f"{tuple(mask_2.shape)}.")
    m1, m2 = (m.float() > 0.5 for m in (mask_1, mask_2))
    for index, mask in enumerate((m1, m2), start=1):
        if not mask.any():
            raise WanInputError(f"the mask of speaker {index} is empty; paint the speaker's face and body.")
    return torch.stack([m1, m2, ~(m1 | m2)]).float()


def regions_left_right(height: int, width: int, face_scale: float = FACE_SCALE) -> torch.Tensor:
    """Speaker 1 in the left half, speaker 2 in the right half, each box inset by `face_scale` of the
    half's size (the official placement when no boxes are given)."""
    rows = slice(int(height * face_scale), int(height * (1 - face_scale)))
    half = width // 2
    left = slice(int(half * face_scale), int(half * (1 - face_scale)))
    right = slice(int(half * face_scale + half), int(half * (1 - face_scale) + half))
    masks = torch.zeros(2, height, width)
    masks[0, rows, left] = 1
    masks[1, rows, right] = 1
    return regions_from_masks(masks[0], masks[1])


def parse_bbox(text: str, height: int, width: int, speaker: int) -> tuple[int, int, int, int]:
    """'x_min, y_min, x_max, y_max' in pixels of the start image (x from the left, y from the top)."""
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) != 4:
        raise WanInputError(f"bbox of speaker {speaker} must be 'x_min, y_min, x_max, y_max' in pixels, got '{text}'.")
    x0, y0, x1, y1 = (int(v) for v in values)
    x0, x1 = max(0, x0), min(width, x1)
    y0, y1 = max(0, y0), min(height, y1)
    if x1 <= x0 or y1 <= y0:
        raise WanInputError(f"bbox of speaker {speaker} '{text}' covers nothing of the {width}x{height} image "
                         "(need x_min < x_max and y_min < y_max inside it).")
    return x0, y0, x1, y1


def regions_from_bboxes(bbox_1: str, bbox_2: str, height: int, width: int) -> torch.Tensor:
    """Regions from two pixel boxes of an image of height x width."""
    masks = torch.zeros(2, height, width)
    for index, text in enumerate((bbox_1, bbox_2)):
        x0, y0, x1, y1 = parse_bbox(text, height, width, index + 1)
        masks[index, y0:y1, x0:x1] = 1
    return regions_from_masks(masks[0], masks[1])


def token_regions(regions: torch.Tensor, latent_hw: tuple[int, int], token_hw: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] regions -> [3, h·w] 0/1 over the latent tokens: nearest to the latent size, then to
    the token grid, as the official pipeline and model do. Refuses a speaker that covers no token."""
    nearest = torch.nn.functional.interpolate
    latent = nearest(regions[None].float(), size=latent_hw, mode="nearest") > 0
    tokens = nearest(latent.float(), size=token_hw, mode="nearest")[0] > 0
    for index in range(2):
        if not tokens[index].any():
            raise WanInputError(f"speaker {index + 1}'s mask covers no latent patch of the {token_hw[1] * 16}x"
                             f"{token_hw[0] * 16}-pixel video ({token_hw[1]}x{token_hw[0]} patches): make it larger.")
    return tokens.flatten(1).float()
