"""Loaders for Anima's three models and its reference images, for any host.

Inside a ComfyUI that knows Anima these hand the file to ComfyUI's own loaders; inside one that
does not (v0.8.0 predates Anima) or outside ComfyUI they build the model from models/anima/ and
wrap it in a MODEL / CLIP / VAE with ComfyUI's method names. Either way the outputs plug into the
AnimaFastTrain nodes and (inside ComfyUI) into core samplers and decoders. What is built from a
file is models/anima/ (the DiT and Qwen3 stream from their files; loading.py has the parts for
ComfyUI's own DiT and the VAE's image functions); these classes only pick paths and devices.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from ..host import (
    NAME as HOST_NAME,
)
from ..host import (
    anima_support,
    bundled_tokenizer_dirs,
    clip_value,
    compute_device,
    input_dir,
    intermediate_device,
    list_models,
    model_folders,
    model_path,
    offload_device,
    text_encoder_device,
    vae_value,
)
from ..host import model_value as host_model_value
from ..host import paths as host_paths
from ..kernels import dram
from ..kernels.precision import resolve_dtype
from ..models.anima.errors import InvalidReferenceImageFile

CATEGORY = "Slipstream/Anima"
WEIGHT_DTYPES = ["default", "bf16", "fp16", "fp32"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _choices(key: str, hint: str) -> list[str]:
    return list_models(key) or [hint]


class SlipstreamAnimaModelLoader:
    DESCRIPTION = ("Loads the Anima diffusion model (Cosmos-Predict2 DiT + LLM adapter) from models/diffusion_models "
                   "as a MODEL with Anima's sampling (rectified flow, shift 3). Works on ComfyUI versions without "
                   "built-in Anima support and outside ComfyUI.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Anima MODEL, for the AnimaFastTrain nodes and any sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "unet_name": (_choices("diffusion_models", "(put anima *.safetensors in models/diffusion_models)"),
                          {"tooltip": "The Anima DiT file (e.g. anima-preview.safetensors)."}),
            "weight_dtype": (WEIGHT_DTYPES, {"default": "default",
                                             "tooltip": "Storage precision of the weights; default keeps the "
                                                        "file's (bf16 for the released model)."}),
        }}

    def load(self, unet_name, weight_dtype) -> tuple:
        path = model_path("diffusion_models", unet_name)
        dtype = None if weight_dtype == "default" else resolve_dtype(weight_dtype)
        comfy = anima_support()
        if comfy is not None:
            return (_comfyui_model(comfy, path, dtype),)
        from ..models.anima.dit import AnimaDiT
        from ..models.anima.model import AnimaModel

        dm = AnimaDiT.from_file(path, dtype=dtype, device=offload_device())
        return (host_model_value(AnimaModel(dm), compute_device(), offload_device()),)


def _comfyui_model(comfy, path: str, dtype: torch.dtype | None):
    """ComfyUI's own Anima when it has one; else its Cosmos DiT with our adapter (see host/comfy_anima.py)."""
    if comfy.has_native_anima():
        return comfy.load_native_model(path, dtype)
    from ..models.anima.loading import comfy_dit_parts

    sd, dit_kwargs, adapter, adapt_text = comfy_dit_parts(path)
    return comfy.build_anima_model(sd, dtype, dit_kwargs, adapter, adapt_text)


class SlipstreamAnimaTextEncoderLoader:
    DESCRIPTION = ("Loads Anima's text encoder (Qwen3-0.6B) with its Qwen and T5 tokenizers as a CLIP. The tokenizer "
                   "folders (qwen25_tokenizer/, t5_tokenizer/) are taken from ComfyUI or from beside the file.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("Anima's CLIP: encodes prompts into Qwen3 states plus the T5 ids Anima's adapter needs.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "clip_name": (_choices("text_encoders", "(put qwen_3_06b_base.safetensors in models/text_encoders)"),
                          {"tooltip": "Anima's text encoder, qwen_3_06b_base.safetensors."}),
        }}

    def load(self, clip_name) -> tuple:
        path = model_path("text_encoders", clip_name)
        # Keyed by file identity, so Offload CLIP keeps this CLIP in RAM under a stable key and the
        # next workflow that loads the same file gets it from RAM instead of disk.
        clip = dram.load_keyed("clip", [path], lambda: _load_text_encoder(path), lambda c: c.patcher.model,
                               type="anima", host=HOST_NAME).obj
        return (clip,)


def _load_text_encoder(path: str):
    """Anima's CLIP from disk: ComfyUI's own loader where it knows Anima, else models/anima/."""
    comfy = anima_support()
    native = None if comfy is None else comfy.load_native_anima_clip(path)
    if native is not None:
        return native
    from ..models.anima.text_encoder import load_text_encoder

    search = [os.path.dirname(path), *model_folders("text_encoders"), *bundled_tokenizer_dirs()]
    encoder = load_text_encoder(path, search, device=offload_device())
    device = text_encoder_device()

    def encode(tokens):
        return encoder.encode(tokens, device=device)

    # inside ComfyUI its model manager holds Qwen3, so it can offload it when the DiT needs the room
    return clip_value(encoder.qwen, encoder.tokenize, encode, device, offload_device())


class SlipstreamAnimaVAELoader:
    DESCRIPTION = ("Loads Anima's VAE (the Qwen-Image VAE, a fine-tuned Wan 2.1 VAE) as a VAE: images in, "
                   "16-channel latents out, one image at a time.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("Anima's VAE, for the AnimaFastTrain nodes and VAE Encode/Decode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "vae_name": (_choices("vae", "(put qwen_image_vae.safetensors in models/vae)"),
                         {"tooltip": "qwen_image_vae.safetensors (or the Wan 2.1 VAE)."}),
        }}

    def load(self, vae_name) -> tuple:
        path = model_path("vae", vae_name)
        comfy = anima_support()
        if comfy is not None:
            return (comfy.load_vae(path),)
        from ..models.anima.loading import image_vae_functions
        from ..models.wan.vae import SPATIAL_FACTOR, WanVAE

        vae = WanVAE.from_file(path, device=offload_device())
        encode, decode = image_vae_functions(vae, intermediate_device())
        return (vae_value(vae, encode, decode, compute_device(), offload_device(), 16, SPATIAL_FACTOR),)


class SlipstreamLoadReferenceImage:
    DESCRIPTION = ("Loads a reference image from the input folder as IMAGE plus its alpha as a MASK where opaque = 1: "
                   "a cut-out character on a transparent background gives the masked trainer its mask directly.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The image, RGB in 0..1 [1, H, W, 3].",
                       "Its alpha channel (1 = opaque, i.e. the subject; all ones without alpha). Note: core Load "
                       "Image gives the inverse.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = host_paths.list_model_files([input_dir()], IMAGE_EXTENSIONS) or ["(put images in the input folder)"]
        return {"required": {"image": (files, {"tooltip": "An image file in ComfyUI's input folder."})}}

    @classmethod
    def IS_CHANGED(cls, image):
        path = os.path.join(input_dir(), image)
        if not os.path.isfile(path):
            return ""
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        if not os.path.isfile(os.path.join(input_dir(), image)):
            return f"Reference image not found in the input folder: {image}"
        return True

    def load(self, image) -> tuple:
        path = os.path.join(input_dir(), image)
        arr = read_reference_pixels(path, image)
        pixels = torch.from_numpy(arr[..., :3].copy())[None]
        alpha = torch.from_numpy(arr[..., 3].copy())[None]
        return (pixels, alpha)


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_reference_pixels(path: str, name: str) -> np.ndarray:
    """[H, W, 4] float32 RGBA in 0..1, scaled by the file's real bit depth (a 16-bit greyscale PNG
    spans 0..65535, not 0..255); an unreadable file raises InvalidReferenceImageFile naming it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in _SIXTEEN_BIT_MODES:
                grey = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
                return np.stack([grey, grey, grey, np.ones_like(grey)], axis=-1)
            return np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    except UnidentifiedImageError as exc:
        raise InvalidReferenceImageFile(
            f"{name} is not an image Pillow can read (PNG, JPEG, WebP or BMP). If it was downloaded, the download "
            "may have saved an error page instead; save the picture again.") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidReferenceImageFile(
            f"{name} could not be read ({exc}); the file is truncated or damaged. Save or copy it again.") from exc
