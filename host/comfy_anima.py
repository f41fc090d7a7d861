"""ComfyUI side of the Anima family (imported only when the pack runs inside ComfyUI).

A ComfyUI that ships Anima (January 2026 and later) loads it with its own code. Older ones, v0.8.0
included, already have the Cosmos-Predict2 DiT Anima is built on, the Wan 2.1 latent format and
flow sampling, but no LLM adapter, no Anima text path and no detection. For those this module
assembles the same thing ComfyUI later shipped: its own `MiniTrainDIT` (so every ComfyUI patch,
wrapper and low-VRAM path applies) plus the adapter module and text function the caller passes in
(this layer cannot import models/), inside a `BaseModel` with Anima's sampling (rectified flow,
shift 3, multiplier 1) and an `extra_conds` that runs the adapter once per conditioning.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base
import comfy.utils
import folder_paths
import torch
from comfy.ldm.cosmos.predict2 import MiniTrainDIT

from .graph_values import CLIP

SUPPORTED_DTYPES = [torch.bfloat16, torch.float32]   # Anima in ComfyUI before fp16 support landed (2026-02-06)


def has_native_anima() -> bool:
    """True when this ComfyUI implements Anima itself (comfy/ldm/anima, from January 2026)."""
    return importlib.util.find_spec("comfy.ldm.anima") is not None


def load_native_model(path: str, dtype: torch.dtype | None):
    options = {"dtype": dtype} if dtype is not None else {}
    return comfy.sd.load_diffusion_model(path, model_options=options)


def load_native_anima_clip(path: str):
    """ComfyUI's own Anima CLIP when this version has one, else None."""
    clip_type = getattr(comfy.sd.CLIPType, "ANIMA", None)
    if clip_type is None:
        return None
    return comfy.sd.load_clip(ckpt_paths=[path], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=clip_type)


class ManagedCLIP(CLIP):
    """The CLIP stand-in with its weights under ComfyUI's model management (see `managed_clip`)."""

    def load_model(self):
        mm.load_models_gpu([self.patcher])
        return self.patcher


def managed_clip(text_encoder: torch.nn.Module, tokenize: Callable, encode: Callable) -> CLIP:
    """Anima's CLIP for a ComfyUI without one of its own (v0.8.0): our Qwen3 behind ComfyUI's ModelPatcher.

    With the stand-in's plain patcher, the first encode would move Qwen3 (~1.2 GB in bf16) to the GPU
    and leave it there, invisible to ComfyUI, so it could not be offloaded when the DiT or VAE needs
    the room. Loading through `load_models_gpu` makes ComfyUI count it and free it like any text
    encoder (and lets the memory nodes offload it).
    """
    patcher = comfy.model_patcher.ModelPatcher(text_encoder, load_device=mm.text_encoder_device(),
                                               offload_device=mm.text_encoder_offload_device())
    return ManagedCLIP(text_encoder, tokenize, encode, patcher.load_device, patcher.offload_device, patcher=patcher)


def load_vae(path: str):
    """ComfyUI's VAE (it recognises the Wan 2.1 / Qwen-Image VAE in every supported version)."""
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))


class AnimaDiT(MiniTrainDIT):
    """ComfyUI's MiniTrainDIT plus Anima's LLM adapter (`llm_adapter.*` keys), as later ComfyUI defines it."""

    def __init__(self, adapter: torch.nn.Module, adapt_text: Callable, **kwargs):
        super().__init__(**kwargs)
        dtype = kwargs.get("dtype")
        adapter = adapter.requires_grad_(False)
        self.llm_adapter = adapter.to(dtype=dtype) if dtype is not None else adapter
        self._adapt_text = adapt_text

    def preprocess_text_embeds(self, text_embeds, text_ids, t5xxl_weights=None):
        if text_ids is None:
            return text_embeds
        return self._adapt_text(self.llm_adapter, text_embeds, text_ids, t5xxl_weights)

    def forward(self, x, timesteps, context, **kwargs):
        ids = kwargs.pop("t5xxl_ids", None)
        weights = kwargs.pop("t5xxl_weights", None)
        if ids is not None:
            context = self.preprocess_text_embeds(context, ids, weights)
        return super().forward(x, timesteps, context, **kwargs)


class AnimaModelConfig(comfy.supported_models_base.BASE):
    unet_config: dict = {}
    unet_extra_config: dict = {}
    latent_format = comfy.latent_formats.Wan21
    sampling_settings = {"multiplier": 1.0, "shift": 3.0}
    supported_inference_dtypes = SUPPORTED_DTYPES

    def __init__(self, unet_config: dict):
        super().__init__(unet_config)
        self.memory_usage_factor = (unet_config.get("model_channels", 2048) / 2048) * 0.95


class AnimaBaseModel(comfy.model_base.BaseModel):
    """Rectified flow; the text conditioning goes through the adapter once, in extra_conds."""

    def __init__(self, model_config, device=None, unet_model=AnimaDiT):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=unet_model)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is None:
            return out
        ids = kwargs.get("t5xxl_ids")
        if ids is not None:
            device = kwargs["device"]
            dtype = self.manual_cast_dtype or self.get_dtype()
            weights = kwargs.get("t5xxl_weights")
            weights = None if weights is None else weights[None, :, None].to(device=device, dtype=dtype)
            cross_attn = self.diffusion_model.preprocess_text_embeds(
                cross_attn.to(device=device, dtype=dtype), ids[None].to(device), t5xxl_weights=weights)
        out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        return out


def build_anima_model(sd: dict, dtype: torch.dtype | None, dit_kwargs: dict, adapter: torch.nn.Module,
                      adapt_text: Callable):
    """A ModelPatcher around ComfyUI's MiniTrainDIT + the given adapter, loaded from `sd` (prefix stripped)."""
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd), supported_dtypes=SUPPORTED_DTYPES,
                              weight_dtype=comfy.utils.weight_dtype(sd))
    config = AnimaModelConfig(dict(dit_kwargs))
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, SUPPORTED_DTYPES))
    model = AnimaBaseModel(config, device=offload_device,
                           unet_model=functools.partial(AnimaDiT, adapter, adapt_text))
    model.load_model_weights(dict(sd), "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
