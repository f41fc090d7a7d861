"""MODEL, CLIP and VAE graph values around modules of our own, with ComfyUI's method names.

Nodes receive MODEL/CLIP/VAE from the graph and use only the small part of ComfyUI's API listed
here. In a plain process every such value is one of these classes; inside ComfyUI they carry the
models ComfyUI cannot build itself (Anima's text encoder on v0.8.0, the int8 loader's own
architectures), so node code does not branch on the host. Nodes reach them through the host
interface (`model_value`, `clip_value`, `vae_value` in host/__init__.py), never by importing this file:

  ModelPatcher  .model (holds .diffusion_model), .model_options, .load_device, .offload_device,
                .clone(), .is_clone(), .model_size(), .loaded_size(), .get_model_object(name),
                .add_object_patch(name, obj), .patch_model() / .unpatch_model() (apply / undo them)
  CLIP          .patcher, .cond_stage_model, .tokenize(text), .load_model(),
                .encode_from_tokens(tokens, return_pooled=False),
                .encode_from_tokens_scheduled(tokens) -> [[cond, {"pooled_output": …}]], .clone()
  VAE           .patcher, .first_stage_model, .encode(pixels [B,H,W,C] 0..1), .decode(latent) -> [B,H,W,C]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _module_bytes(module: nn.Module, device: torch.device | None = None) -> int:
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if device is None or t.device == device:
            total += t.numel() * t.element_size()
    return total


class ModelPatcher:
    """A module plus where it runs and per-clone options; clones share the module (like ComfyUI)."""

    def __init__(self, model: nn.Module, load_device: torch.device, offload_device: torch.device,
                 parent: ModelPatcher | None = None):
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.object_patches: dict[str, Any] = {}
        self._object_backup: dict[str, Any] = {}
        self.parent = parent

    def clone(self) -> ModelPatcher:
        twin = ModelPatcher(self.model, self.load_device, self.offload_device, parent=self)
        twin.model_options = _copy_options(self.model_options)
        twin.object_patches = dict(self.object_patches)
        return twin

    def is_clone(self, other: Any) -> bool:
        return getattr(other, "model", None) is self.model

    def model_size(self) -> int:
        return _module_bytes(self.model)

    def loaded_size(self) -> int:
        if self.load_device == self.offload_device:
            return 0
        return _module_bytes(self.model, self.load_device)

    def get_model_object(self, name: str) -> Any:
        """The attribute at dotted `name` as this clone sees it: its object patch if it has one."""
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self._object_backup:
            return self._object_backup[name]
        obj: Any = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def add_object_patch(self, name: str, obj: Any) -> None:
        """Replace the attribute at dotted `name` while this clone runs (ComfyUI's object patches)."""
        self.object_patches[name] = obj

    def patch_model(self) -> None:
        """Set this clone's object patches on the shared module, remembering what they replace."""
        for name, obj in self.object_patches.items():
            owner, attr = self._owner(name)
            self._object_backup.setdefault(name, getattr(owner, attr))
            setattr(owner, attr, obj)

    def unpatch_model(self) -> None:
        """Put back every attribute patch_model() replaced."""
        for name, original in self._object_backup.items():
            owner, attr = self._owner(name)
            setattr(owner, attr, original)
        self._object_backup.clear()

    def _owner(self, name: str) -> tuple[Any, str]:
        *path, attr = name.split(".")
        owner: Any = self.model
        for part in path:
            owner = getattr(owner, part)
        return owner, attr

    def load(self) -> None:
        """Move the weights to the compute device (ComfyUI's load_models_gpu does this in ComfyUI)."""
        self.model.to(self.load_device)

    def unload(self) -> int:
        """Move the weights to the offload device; returns the bytes that left the compute device."""
        freed = self.loaded_size()
        self.model.to(self.offload_device)
        return freed


def _copy_options(options: dict[str, Any]) -> dict[str, Any]:
    """Copy nested dicts and lists (ComfyUI's clone semantics); leave tensors and modules shared."""
    def copy_value(value):
        if isinstance(value, dict):
            return {k: copy_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy_value(v) for v in value]
        return value
    return copy_value(options)


class CLIP:
    """A text encoder: `tokenizer(text) -> tokens`, `encoder(tokens) -> (cond [B,L,C], pooled | None[, extra])`.

    `extra` (a dict, like the third value of ComfyUI's encode_token_weights) joins the returned
    dict and the conditioning's options — e.g. Anima's `t5xxl_ids` / `t5xxl_weights`.
    """

    def __init__(self, cond_stage_model: nn.Module, tokenizer: Callable[[str], Any],
                 encode: Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]],
                 load_device: torch.device, offload_device: torch.device, patcher: ModelPatcher | None = None):
        self.cond_stage_model = cond_stage_model
        self.tokenizer = tokenizer
        self._encode = encode
        self.patcher = patcher or ModelPatcher(cond_stage_model, load_device, offload_device)

    def clone(self) -> CLIP:
        twin = copy.copy(self)
        twin.patcher = self.patcher.clone()
        return twin

    def tokenize(self, text: str) -> Any:
        return self.tokenizer(text)

    def load_model(self) -> ModelPatcher:
        """Put the weights on the load device before encoding (ComfyUI's CLIP has the same method; a
        host adapter overrides it to load through the host's model manager)."""
        self.patcher.load()
        return self.patcher

    def encode_from_tokens(self, tokens: Any, return_pooled: bool = False, return_dict: bool = False):
        self.load_model()
        cond, pooled, *rest = self._encode(tokens)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled, **(rest[0] if rest else {})}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: Any) -> list:
        out = self.encode_from_tokens(tokens, return_dict=True)
        cond = out.pop("cond")
        return [[cond, out]]


class VAE:
    """An image/video autoencoder in ComfyUI's conventions: pixels [B,H,W,C] in 0..1 <-> raw latents."""

    def __init__(self, first_stage_model: nn.Module, encode: Callable[[torch.Tensor], torch.Tensor],
                 decode: Callable[[torch.Tensor], torch.Tensor], load_device: torch.device,
                 offload_device: torch.device, latent_channels: int, downscale_ratio: int):
        self.first_stage_model = first_stage_model
        self._encode = encode
        self._decode = decode
        self.latent_channels = latent_channels
        self.downscale_ratio = downscale_ratio
        self.patcher = ModelPatcher(first_stage_model, load_device, offload_device)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.patcher.load()
        return self._encode(pixels[..., :3])

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        self.patcher.load()
        return self._decode(latent)
