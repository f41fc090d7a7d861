"""Wan MultiTalk Audio Embeds: speech of one or two speakers -> MultiTalk / InfiniteTalk conditioning.

The work happens in models/wan/multitalk_speech.py (features, windows, speaker placement on the
timeline) and models/wan/multitalk_conditioning.py (speaker regions); this node reads its inputs,
shows progress and returns the conditioning plus the audio to put under the video.
"""

from __future__ import annotations

import torch

from ..host import ProgressBar
from ..models.wan.errors import WanInputError
from ..models.wan.multitalk_conditioning import regions_from_bboxes, regions_from_masks, regions_left_right
from ..models.wan.multitalk_speech import AUDIO_TYPES, multitalk_speech
from .wan import CATEGORY

PLACEMENTS = ("masks", "left / right", "bounding boxes")
_NOMINAL_HW = (512, 512)     # left / right boxes are proportional: any size of the video's aspect ratio


def speaker_regions(placement: str, mask_1=None, mask_2=None, bbox_1: str = "", bbox_2: str = "",
                    start_image=None) -> torch.Tensor:
    """[3, H, W] regions (speaker 1, speaker 2, background) from the node's placement inputs."""
    if placement == "masks":
        if mask_1 is None or mask_2 is None:
            raise WanInputError("placement 'masks' needs mask_1 and mask_2 (white where each speaker is, on the "
                             "start image); or choose the 'left / right' or 'bounding boxes' placement.")
        first, second = (m[0] if m.dim() == 3 else m for m in (mask_1, mask_2))
        return regions_from_masks(first, second)
    if placement == "left / right":
        return regions_left_right(*_NOMINAL_HW)
    if placement == "bounding boxes":
        if start_image is None:
            raise WanInputError("placement 'bounding boxes' needs start_image: the boxes are pixels of that image.")
        return regions_from_bboxes(bbox_1, bbox_2, int(start_image.shape[1]), int(start_image.shape[2]))
    raise WanInputError(f"placement must be one of {PLACEMENTS}, got '{placement}'.")


class WanMultiTalkEmbeds:
    DESCRIPTION = ("Encodes speech for MultiTalk / InfiniteTalk (Wan 2.1 I2V-14B with a MultiTalk or InfiniteTalk "
                   "model loaded): per-frame wav2vec2 features of every layer (chinese-wav2vec2-base), each frame "
                   "with its 4 neighbours, as the official scripts. Two speakers need their places in the start "
                   "image (masks, left / right halves or pixel boxes). Silent audio is allowed: that speaker keeps "
                   "the mouth still.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("SLIPSTREAM_WAN_AUDIO", "AUDIO")
    RETURN_NAMES = ("audio_embeds", "audio")
    OUTPUT_TOOLTIPS = ("The speech conditioning, for the Wan Sampler's audio_embeds input.",
                       "The speech as the video plays it (one speaker's clip, or both speakers' clips placed and "
                       "mixed at 16 kHz), cut to the video's length: connect it to Video Combine.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "speech_encoder": ("SLIPSTREAM_SPEECH_ENCODER", {"tooltip": "From Load Speech Encoder (wav2vec2): "
                                                                        "chinese-wav2vec2-base for MultiTalk."}),
            "audio_1": ("AUDIO", {"tooltip": "Speech of speaker 1 (the only speaker, or the first of two)."}),
            "num_frames": ("INT", {"default": 81, "min": 1, "max": 100001, "step": 4,
                                   "tooltip": "Video frames to make (4k + 1), the same as the video's length."}),
            "frame_rate": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 120.0, "step": 0.5,
                                     "tooltip": "Frames per second of the video; MultiTalk is trained at 25."}),
            "audio_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                      "tooltip": "Strength of the speech in every block (1 = the official model; "
                                                 "0 = no speech)."}),
            "normalize_loudness": ("BOOLEAN", {"default": True, "tooltip": "Level each clip to -23 LUFS first, as "
                                                                            "the official scripts do."}),
            "multi_audio_type": (list(AUDIO_TYPES), {"default": "para",
                                                     "tooltip": "Two speakers: 'para' = both clips start together "
                                                                "(they talk at the same time); 'add' = speaker 2 "
                                                                "talks after speaker 1 has finished."}),
            "placement": (list(PLACEMENTS), {"default": "masks",
                                              "tooltip": "Two speakers: where each one is in the start image. "
                                                         "'masks' = mask_1/mask_2; 'left / right' = speaker 1 in "
                                                         "the left half, speaker 2 in the right; 'bounding "
                                                         "boxes' = bbox_1/bbox_2 in pixels of start_image."}),
        }, "optional": {
            "audio_2": ("AUDIO", {"tooltip": "Speech of speaker 2 (optional)."}),
            "mask_1": ("MASK", {"tooltip": "Two speakers, placement 'masks': white where speaker 1 is, on the start "
                                           "image (its size and crop as it goes into the image-to-video encode)."}),
            "mask_2": ("MASK", {"tooltip": "Two speakers, placement 'masks': white where speaker 2 is."}),
            "bbox_1": ("STRING", {"default": "", "tooltip": "Placement 'bounding boxes': speaker 1's box as "
                                                            "'x_min, y_min, x_max, y_max' in pixels of start_image "
                                                            "(x from the left, y from the top)."}),
            "bbox_2": ("STRING", {"default": "", "tooltip": "Placement 'bounding boxes': speaker 2's box."}),
            "start_image": ("IMAGE", {"tooltip": "Placement 'bounding boxes': the start image the boxes refer to "
                                                 "(only its size is used)."}),
        }}

    def encode(self, speech_encoder, audio_1, num_frames, frame_rate, audio_scale, normalize_loudness,
               multi_audio_type, placement, audio_2=None, mask_1=None, mask_2=None, bbox_1="", bbox_2="",
               start_image=None) -> tuple:
        regions = None
        if audio_2 is not None:
            regions = speaker_regions(placement, mask_1, mask_2, bbox_1, bbox_2, start_image)
        bar = ProgressBar(1)
        try:
            conditioning, mux = multitalk_speech(
                speech_encoder, audio_1, audio_2, num_frames=num_frames, frame_rate=frame_rate,
                audio_scale=audio_scale, normalize_loudness=normalize_loudness, audio_type=multi_audio_type,
                regions=regions, progress=bar.update_absolute)
        finally:
            bar.close()
        return (conditioning, mux)
