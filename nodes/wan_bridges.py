"""Bridges from core ComfyUI values to the Wan family's embeds.

They let a core Load CLIP (umT5, including GGUF text encoders from other packs) with CLIPTextEncode,
and core Load CLIP Vision with CLIP Vision Encode, feed the Wan Sampler and Wan Image to Video Encode.
The conversion rules are in models/wan/bridges.py.
"""

from __future__ import annotations

from ..models.wan.bridges import clip_embeds_from_vision_output, text_embeds_from_conditioning
from .wan import CATEGORY


class WanTextEmbedsFromConditioning:
    DESCRIPTION = ("Uses a core CONDITIONING (Load CLIP with a umT5-XXL file, type 'wan', then CLIPTextEncode) "
                   "as Wan text embeds, so core and third-party text encoders feed the Wan Sampler. Several "
                   "entries (Conditioning Combine) become prompt sections of the video, in order, as 'a | b' "
                   "does in Wan Text Encode.")
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("SLIP_WAN_TEXT_EMBEDS",)
    RETURN_NAMES = ("text_embeds",)
    OUTPUT_TOOLTIPS = ("Prompt embeddings for the Wan Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "From CLIPTextEncode with a umT5-XXL CLIP: what the "
                                                         "video shows."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "From CLIPTextEncode with the same CLIP: what to avoid "
                                                         "(used when cfg > 1). Leave empty for no negative prompt."}),
            },
        }

    def convert(self, positive, negative=None) -> tuple:
        return (text_embeds_from_conditioning(positive, negative),)


class WanClipEmbedsFromVisionOutput:
    DESCRIPTION = ("Uses a core CLIP_VISION_OUTPUT (Load CLIP Vision with clip_vision_h, then CLIP Vision Encode) "
                   "as Wan CLIP image tokens for Wan Image to Video Encode. With an end image it gives the 514 "
                   "tokens first/last-frame models read.")
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("SLIP_WAN_CLIP_EMBEDS",)
    RETURN_NAMES = ("clip_embeds",)
    OUTPUT_TOOLTIPS = ("CLIP image tokens for Wan Image to Video Encode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {"tooltip": "From core CLIP Vision Encode of the "
                                                                         "start image (crop 'none' matches Wan)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Scales the image tokens (how much the look follows the image)."}),
            },
            "optional": {
                "clip_vision_output_end": ("CLIP_VISION_OUTPUT", {"tooltip": "CLIP Vision Encode of the end image, "
                                                                             "for first/last-frame video."}),
            },
        }

    def convert(self, clip_vision_output, strength, clip_vision_output_end=None) -> tuple:
        return (clip_embeds_from_vision_output(clip_vision_output, clip_vision_output_end, strength),)
