"""Wan encoders and decode: umT5 text, CLIP vision, the Wan 2.1 / 2.2 VAE, I2V/FLF2V/TI2V/T2V embeds and
Wan Decode.

Each loader returns a small handle (models/wan/encoders.py); each encode moves its model to the
compute device for the call and, with force_offload, back to RAM afterwards.
"""

from __future__ import annotations

import logging

import torch

from ..host import (
    ProgressBar,
    compute_device,
    list_models,
    model_folders,
    model_path,
    notice,
    offload_device,
    soft_empty_cache,
)
from ..host.paths import list_model_files
from ..kernels.precision import resolve_dtype
from ..models.checkpoint import load_state_dict
from ..models.finite import BadSettingError, finite_input, finite_number
from ..models.gguf_file import GGUF_EXTS, is_gguf
from ..models.wan.encoders import (
    WanClipVisionHandle,
    WanTextEncoderHandle,
    WanVAEHandle,
    decode_latent,
    encode_clip,
    encode_text,
    image_to_video_embeds,
    require_images,
)
from ..models.wan.pipeline import WanImageEmbeds, round_video_size
from ..models.wan.t5 import UMT5Encoder
from ..models.wan.tiling import Tiling
from ..models.wan.tokenizer import UMT5Tokenizer, load_tokenizer
from ..models.wan.vae22 import load_wan_vae
from .wan import CATEGORY, LOAD_DEVICES, PRECISIONS

log = logging.getLogger("slipstream.wan")

OFFLOAD_FIRST = (LOAD_DEVICES[1], LOAD_DEVICES[0])


def _device(load_device: str) -> torch.device:
    return compute_device() if load_device == "main_device" else offload_device()


def _size_inputs(width=832, height=480, frames=81) -> dict:
    return {
        "width": ("INT", {"default": width, "min": 16, "max": 8192, "step": 16,
                          "tooltip": "Video width in pixels (multiple of 16; other values are rounded)."}),
        "height": ("INT", {"default": height, "min": 16, "max": 8192, "step": 16,
                           "tooltip": "Video height in pixels (multiple of 16; other values are rounded)."}),
        "num_frames": ("INT", {"default": frames, "min": 1, "max": 10001, "step": 4,
                               "tooltip": "Frames to generate: 1+4k (81 = 5 s at 16 fps; others are rounded)."}),
    }


def _check_size(width: object, height: object, num_frames: object) -> None:
    """Refuse sizes no rounding can make sense of (the widgets stop at 16 and 1; API calls do not)."""
    for name, value, low in (("width", width, 16), ("height", height, 16), ("num_frames", num_frames, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadSettingError(f"{name} must be a whole number, got {type(value).__name__} {value!r}.")
        if value < low:
            raise BadSettingError(f"{name} is {value}; it must be at least {low} "
                                  f"({'a multiple of 16 pixels' if low == 16 else '1+4k frames: 1, 5, 9, … 81'}).")


def _valid_size(width: int, height: int, num_frames: int, multiple: int = 16) -> tuple[int, int, int]:
    """Rounded to what Wan makes: sides multiples of `multiple` (16; 32 for the Wan 2.2 VAE), 1+4k frames."""
    _check_size(width, height, num_frames)
    width, height, num_frames, note = round_video_size(width, height, num_frames)
    if multiple != 16 and (width % multiple or height % multiple):
        w, h = (max(multiple, (v + multiple // 2) // multiple * multiple) for v in (width, height))
        note = f"{note + '; ' if note else 'Wan: rounded '}size {width}x{height} -> {w}x{h} (multiples of {multiple})"
        width, height = w, h
    if note:
        notice("Wan", note.removeprefix("Wan: "))
    return width, height, num_frames


def _tiling(enabled: bool, tile_size: int, tile_overlap: int, scale: int = 8) -> Tiling | None:
    """Tiles in pixels on the VAE's latent grid (`scale` pixels per latent element: 8, or 16 for Wan 2.2)."""
    if not enabled:
        return None
    if tile_overlap >= tile_size:
        raise ValueError(f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size}).")
    return Tiling.from_pixels(tile_size, tile_overlap, scale)


# ---------------------------------------------------------------------------------- text


def _text_encoder_files() -> list[str]:
    """The text_encoders folder's files, GGUF included (ComfyUI's own list leaves .gguf out)."""
    return sorted(set(list_models("text_encoders")) | set(list_model_files(model_folders("text_encoders"), GGUF_EXTS)))


def _load_gguf_umt5(path: str, dtype: torch.dtype, device) -> tuple[UMT5Encoder, UMT5Tokenizer]:
    """A GGUF umT5 (llama.cpp naming): Linears stay quantized; the tokenizer is spiece.model beside it."""
    from ..models.gguf_t5 import load_umt5_gguf
    tokenizer = load_tokenizer(path)   # before the weights: a missing tokenizer fails fast
    return load_umt5_gguf(path, dtype=dtype, device=device), tokenizer


class WanTextEncoderLoader:
    DESCRIPTION = ("Loads the umT5-XXL text encoder Wan 2.1 uses (ComfyUI's umt5_xxl_*.safetensors with its "
                   "tokenizer inside, the official .pth with spiece.model beside it, or a GGUF encoder such as "
                   "umt5-xxl-encoder-Q8_0.gguf with spiece.model beside it).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("SLIP_WAN_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The text encoder, for Wan Text Encode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": (_text_encoder_files() or ["(no text encoders found)"],
                           {"tooltip": "umT5-XXL file from models/text_encoders, e.g. umt5_xxl_fp8_e4m3fn_scaled."
                                       "safetensors, or a GGUF (umt5-xxl-encoder-Q8_0.gguf) with spiece.model "
                                       "beside it."}),
            "precision": (list(PRECISIONS), {"default": "bf16", "tooltip": "Compute precision of the encoder."}),
            "load_device": (list(OFFLOAD_FIRST), {"default": "offload_device",
                                                  "tooltip": "Where it waits between uses (RAM keeps VRAM free "
                                                             "for the video model)."}),
        }}

    def load(self, model_name, precision, load_device) -> tuple:
        path = model_path("text_encoders", model_name)
        resident = _device(load_device)
        if is_gguf(path):
            encoder, tokenizer = _load_gguf_umt5(path, resolve_dtype(precision, compute_device()), resident)
            return (WanTextEncoderHandle(encoder, tokenizer, model_name, resident),)
        sd = load_state_dict(path)
        tokenizer = load_tokenizer(path, sd)
        encoder = UMT5Encoder.from_state_dict(sd, dtype=resolve_dtype(precision, compute_device()),
                                              device=resident, consume=True)
        return (WanTextEncoderHandle(encoder, tokenizer, model_name, resident),)


class WanTextEncode:
    DESCRIPTION = ("Turns the positive and negative prompts into umT5 embeddings. Separate prompts with '|' to "
                   "give each part of a long (context-window) video its own prompt.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("SLIP_WAN_TEXT_EMBEDS",)
    RETURN_NAMES = ("text_embeds",)
    OUTPUT_TOOLTIPS = ("Prompt embeddings for the Wan Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "text_encoder": ("SLIP_WAN_TEXT_ENCODER", {"tooltip": "From Wan Text Encoder Loader."}),
            "positive_prompt": ("STRING", {"default": "", "multiline": True,
                                           "tooltip": "What the video shows. 'a | b' = prompt a for the first half, "
                                                      "b for the second (with context windows)."}),
            "negative_prompt": ("STRING", {"default": "", "multiline": True,
                                           "tooltip": "What to avoid (used when cfg > 1)."}),
            "device": (["gpu", "cpu"], {"default": "gpu",
                                        "tooltip": "Run the encoder on the GPU (fast) or the CPU (no VRAM, slow)."}),
            "force_offload": ("BOOLEAN", {"default": True,
                                          "tooltip": "Send the encoder back to its load device afterwards."}),
        }}

    def encode(self, text_encoder, positive_prompt, negative_prompt, device, force_offload) -> tuple:
        target = compute_device() if device == "gpu" else torch.device("cpu")
        bar = ProgressBar(len(text_encoder.encoder.blocks))
        try:
            embeds = encode_text(text_encoder, positive_prompt, negative_prompt, target, offload=force_offload,
                                 progress=bar.update_absolute)
        finally:
            bar.close()
        if force_offload:
            soft_empty_cache()
        for row in (*embeds.positive, embeds.negative):
            finite_input("text_embeds", row, "Wan Text Encode")   # an fp16 overflow in umT5 ends here
        return (embeds,)


# ---------------------------------------------------------------------------------- CLIP vision


class WanClipVisionLoader:
    DESCRIPTION = ("Loads the CLIP ViT-H/14 vision model Wan 2.1 I2V conditions on (clip_vision_h.safetensors, "
                   "the official open-clip .pth, or an open_clip file).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("SLIP_WAN_CLIP_VISION",)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The CLIP vision model, for Wan CLIP Vision Encode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": (list_models("clip_vision") or ["(no clip vision models found)"],
                           {"tooltip": "CLIP vision file from models/clip_vision, e.g. clip_vision_h.safetensors."}),
            "precision": (list(PRECISIONS), {"default": "fp16", "tooltip": "Compute precision (official: fp16)."}),
            "load_device": (list(OFFLOAD_FIRST), {"default": "offload_device",
                                                  "tooltip": "Where it waits between uses."}),
        }}

    def load(self, model_name, precision, load_device) -> tuple:
        from ..models.wan.clip_vision import WanClipVision

        path = model_path("clip_vision", model_name)
        resident = _device(load_device)
        model = WanClipVision.from_file(path, dtype=resolve_dtype(precision, compute_device()), device=resident)
        return (WanClipVisionHandle(model, model_name, resident),)


class WanClipVisionEncode:
    DESCRIPTION = ("Encodes the start image with CLIP vision for image-to-video (the 257 tokens Wan I2V attends to). "
                   "With an end image too, the start tokens then the end tokens (514): the context first/last-frame "
                   "(FLF2V) models expect; plain I2V models take it as well.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("SLIP_WAN_CLIP_EMBEDS",)
    RETURN_NAMES = ("clip_embeds",)
    OUTPUT_TOOLTIPS = ("CLIP image tokens for Wan Image to Video Encode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "clip_vision": ("SLIP_WAN_CLIP_VISION", {"tooltip": "From Wan CLIP Vision Loader."}),
            "image": ("IMAGE", {"tooltip": "The start image (several images are averaged)."}),
            "crop": (["disabled", "center"], {"default": "disabled",
                                              "tooltip": "disabled squashes the whole image to a square, as Wan was "
                                                         "trained; center keeps the aspect and cuts the sides."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Scales the image tokens (how much the look follows the image)."}),
            "force_offload": ("BOOLEAN", {"default": True,
                                          "tooltip": "Send the model back to its load device afterwards."}),
        }, "optional": {
            "end_image": ("IMAGE", {"tooltip": "The last frame, for first/last-frame video (FLF2V): its tokens follow "
                                               "the start image's. Leave empty for plain image-to-video."}),
        }}

    def encode(self, clip_vision, image, crop, strength, force_offload, end_image=None) -> tuple:
        require_images(image, "image")
        if end_image is not None:
            require_images(end_image, "end_image")
        finite_number("strength", strength, "Wan CLIP Vision Encode")
        bar = ProgressBar(clip_vision.model.config.feature_layers)
        try:
            feats = encode_clip(clip_vision, image, compute_device(), crop == "center", strength,
                                offload=force_offload, progress=bar.update_absolute, end_images=end_image)
        finally:
            bar.close()
        return (feats,)


# ---------------------------------------------------------------------------------- VAE, embeds, decode


class WanVAELoader:
    DESCRIPTION = ("Loads a Wan video VAE: the Wan 2.1 VAE (wan_2.1_vae.safetensors, Wan2.1_VAE.pth; 16 latent "
                   "channels, for Wan 2.1 and Wan 2.2 A14B) or the Wan 2.2 VAE (wan2.2_vae.safetensors, "
                   "Wan2.2_VAE.pth; 48 channels, for Wan 2.2 TI2V-5B). Which one a file is, is read from it.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("SLIP_WAN_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE, for Wan Image to Video Encode and Wan Decode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": (list_models("vae") or ["(no vae found)"],
                           {"tooltip": "Wan VAE file from models/vae: wan_2.1_vae for Wan 2.1 and 2.2 A14B models, "
                                       "wan2.2_vae for TI2V-5B."}),
            "precision": (list(PRECISIONS), {"default": "bf16", "tooltip": "Compute precision of the VAE."}),
        }}

    def load(self, model_name, precision) -> tuple:
        path = model_path("vae", model_name)
        vae = load_wan_vae(path, dtype=resolve_dtype(precision, compute_device()), device=offload_device())
        return (WanVAEHandle(vae, model_name, offload_device()),)


class WanEmptyEmbeds:
    DESCRIPTION = "The size and length of a text-to-video generation, for the Wan Sampler."
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("SLIP_WAN_IMAGE_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("Video size for the Wan Sampler (no start image).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": _size_inputs()}

    def make(self, width, height, num_frames) -> tuple:
        return (WanImageEmbeds(*_valid_size(width, height, num_frames)),)


class WanImageToVideoEncode:
    DESCRIPTION = ("Prepares image-to-video: the start image is resized to the video size, VAE-encoded as the "
                   "first frame of an otherwise grey clip and marked as known, with its CLIP tokens. An end image "
                   "becomes the known last frame (first/last-frame video with FLF2V or I2V models). With the Wan "
                   "2.2 VAE it prepares TI2V-5B instead: the start frame is the clean first latent frame.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("SLIP_WAN_IMAGE_EMBEDS",)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("I2V conditioning for the Wan Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": ("SLIP_WAN_VAE", {"tooltip": "From Wan VAE Loader."}),
            "start_image": ("IMAGE", {"tooltip": "The first frame of the video."}),
            **_size_inputs(),
            "noise_aug_strength": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.001,
                                             "tooltip": "Noise added to the start image: more motion, less "
                                                        "faithful first frame."}),
            "force_offload": ("BOOLEAN", {"default": True, "tooltip": "Send the VAE back to RAM afterwards."}),
            "tiled_vae": ("BOOLEAN", {"default": False, "tooltip": "Encode in tiles (for very large frames)."}),
        }, "optional": {
            "clip_embeds": ("SLIP_WAN_CLIP_EMBEDS", {"tooltip": "From Wan CLIP Vision Encode (the same image; with "
                                                                "the end image too for FLF2V). Wan 2.1 I2V/FLF2V "
                                                                "need it; Wan 2.2 A14B and TI2V-5B have no CLIP."}),
            "end_image": ("IMAGE", {"tooltip": "The last frame (first/last-frame video); the same size as the start "
                                               "image. Not for TI2V-5B."}),
        }}

    def encode(self, vae, start_image, width, height, num_frames, noise_aug_strength, force_offload,
               tiled_vae, clip_embeds=None, end_image=None) -> tuple:
        require_images(start_image, "start_image")
        if end_image is not None:
            require_images(end_image, "end_image")
        finite_number("noise_aug_strength", noise_aug_strength, "Wan Image to Video Encode")
        width, height, num_frames = _valid_size(width, height, num_frames, multiple=2 * vae.vae.SPATIAL)
        bar = ProgressBar((num_frames - 1) // 4 + 1)
        try:
            embeds = image_to_video_embeds(vae, start_image, width, height, num_frames, compute_device(),
                                           noise_aug_strength, clip=clip_embeds, offload=force_offload,
                                           tiling=_tiling(tiled_vae, 512, 64, vae.vae.SPATIAL),
                                           progress=bar.update_absolute, end_image=end_image)
        finally:
            bar.close()
        return (embeds,)


class WanDecode:
    DESCRIPTION = ("Decodes a Wan video latent to frames, one latent frame at a time (memory does not grow with "
                   "length). Works on latents from core Wan nodes too.")
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The video frames [F,H,W,3] in 0..1 (batch items one after another).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae": ("SLIP_WAN_VAE", {"tooltip": "From Wan VAE Loader."}),
            "samples": ("LATENT", {"tooltip": "A Wan video latent (Wan Sampler or core Wan nodes)."}),
            "enable_vae_tiling": ("BOOLEAN", {"default": False,
                                              "tooltip": "Decode in overlapping tiles: less VRAM at high "
                                                         "resolution, seams blended."}),
            "tile_size": ("INT", {"default": 272, "min": 64, "max": 2048, "step": 8,
                                  "tooltip": "Tile side in pixels (when tiling)."}),
            "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 8,
                                     "tooltip": "Pixels shared by neighbouring tiles (when tiling)."}),
            "force_offload": ("BOOLEAN", {"default": True, "tooltip": "Send the VAE back to RAM afterwards."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size, tile_overlap):
        if tile_overlap >= tile_size:
            return f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size})."
        return True

    def decode(self, vae, samples, enable_vae_tiling, tile_size, tile_overlap, force_offload) -> tuple:
        latent = finite_input("samples", samples["samples"], "Wan Decode")
        bar = ProgressBar(latent.shape[0] * latent.shape[2] if latent.dim() == 5 else 1)
        try:
            images = decode_latent(vae, latent, compute_device(), offload=force_offload,
                                   tiling=_tiling(enable_vae_tiling, tile_size, tile_overlap, vae.vae.SPATIAL),
                                   progress=bar.update_absolute)
        finally:
            bar.close()
        return (images,)
