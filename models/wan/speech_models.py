"""Which speech model a file holds (MultiTalk / InfiniteTalk, FantasyTalking), and attaching it to a Wan DiT.

    choice = describe_speech_model(path)             # cheap: reads the key names only
    adapter = load_speech_model(path, dit)           # the family's adapter, validated against dit.config
    attach_speech_model(dit, path)                   # the above, attached, stored like the blocks

The families recognise their own files (`is_multitalk_file`, `is_fantasytalking_file` on the key
names); this module only dispatches and, for a file neither claims, says what the file looks like
so the user knows which loader it belongs to.

Storage: the Wan loader attaches the speech model right after the base weights are read and before
LoRA merging, int8 quantization and block-swap planning, so all of those see the added per-block
weights. The base weights may already be fp8 at that point (fp8 storage is decided while reading);
`attach_speech_model` then stores the added block Linears in the same fp8 format, so
`quantization` covers the audio weights too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from ...kernels.cast_linear import CastLinear
from ...kernels.fp8 import quantize_scaled_fp8
from ...kernels.precision import is_fp8
from ..checkpoint import PICKLE_EXTS, load_state_dict, read_safetensors_header
from .audio_hooks import AudioAdapter
from .dit import WanDiT
from .fantasytalking import FantasyTalkingAdapter, is_fantasytalking_file
from .multitalk import MultiTalkAdapter, is_multitalk_file

FAMILY_LABELS = {"multitalk": "MultiTalk / InfiniteTalk", "fantasytalking": "FantasyTalking"}


@dataclass(frozen=True)
class SpeechFamily:
    name: str
    recognise: Callable[[Collection[str]], bool]
    adapter: type


def families() -> tuple[SpeechFamily, ...]:
    """The speech model families (each recognises its own files)."""
    return (SpeechFamily("multitalk", is_multitalk_file, MultiTalkAdapter),
            SpeechFamily("fantasytalking", is_fantasytalking_file, FantasyTalkingAdapter))


@dataclass(frozen=True)
class SpeechModelChoice:
    """What the speech model loader node hands the Wan loader: the file and its family, nothing loaded."""

    path: str
    name: str
    family: str

    @property
    def label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)


class SpeechModelError(ValueError):
    """A file that is no speech model, or one this Wan model cannot take."""


def _looks_like(keys: Collection[str]) -> str:
    """A short guess at what a file that is no speech model holds, with where it belongs."""
    def has(*parts: str) -> bool:
        return any(all(p in k for p in parts) for k in keys)

    if has("lora_") or has("lora.") or has(".alpha"):
        return "a LoRA (connect it through Wan LoRA Select)"
    if has("feature_extractor") or has("encoder.layers.", "attention.k_proj") or has("feature_projection"):
        return "a wav2vec2 speech encoder (load it with Load Speech Encoder, from models/audio_encoders)"
    if has("visual.") or has("vision_model."):
        return "a CLIP vision model (Wan CLIP Vision Loader, from models/clip_vision)"
    if has("encoder.block.") or has("shared.weight"):
        return "a umT5 text encoder (Wan Text Encoder Loader)"
    if has("decoder.") and has("encoder.conv"):
        return "a VAE (Wan VAE Loader)"
    if has("blocks.", "self_attn.q.weight") or has("patch_embedding"):
        return ("a Wan DiT without speech weights (load it in the Wan Model Loader's 'model'; a speech model file "
                "holds audio_proj / audio_cross_attn or proj_model / k_proj weights)")
    return "none of the known speech model layouts"


def family_of_keys(keys: Collection[str], what: str) -> str:
    """The family whose files have these key names; a clear error naming what the file looks like otherwise."""
    for family in families():
        if family.recognise(keys):
            return family.name
    sample = ", ".join(sorted(keys)[:4])
    raise SpeechModelError(
        f"{what} is not a MultiTalk / InfiniteTalk or FantasyTalking speech model: it looks like "
        f"{_looks_like(keys)}. Its first keys: {sample or '(no tensors)'}.")


def _file_keys(path: str) -> list[str]:
    if path.lower().endswith(PICKLE_EXTS):
        return list(load_state_dict(path))
    header, _ = read_safetensors_header(path)
    return list(header)


def describe_speech_model(path: str, name: str | None = None) -> SpeechModelChoice:
    """The file's family from its key names (a safetensors file is not read beyond its header)."""
    name = name or path.replace("\\", "/").rsplit("/", 1)[-1]
    return SpeechModelChoice(path, name, family_of_keys(_file_keys(path), name))


def _family(name: str) -> SpeechFamily:
    return next(f for f in families() if f.name == name)


def load_speech_model(path: str, dit: WanDiT, *, dtype: torch.dtype | None = None,
                      state_dict: Mapping[str, torch.Tensor] | None = None) -> AudioAdapter:
    """The adapter of the speech model in `path`, validated against `dit.config` by its family (a
    T2V, 1.3B or Wan 2.2 model raises the family's error); not yet attached."""
    sd = dict(state_dict) if state_dict is not None else load_state_dict(path)
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    family = _family(family_of_keys(list(sd), name))
    kwargs = {"dtype": dtype if dtype is not None else dit.compute_dtype}
    if "what" in inspect.signature(family.adapter.from_state_dict).parameters:
        kwargs["what"] = name          # the family's errors then name the file
    return family.adapter.from_state_dict(sd, dit, **kwargs)


def _block_linears(dit: WanDiT) -> dict[str, CastLinear]:
    return {name: mod for name, mod in dit.named_modules() if name.startswith("blocks.") and isinstance(mod, CastLinear)}


def attach_speech_model(dit: WanDiT, path: str) -> AudioAdapter:
    """Load, attach, and store the added weights as the DiT stores its own: the added block Linears in
    the blocks' (possibly fp8) weight format, everything on the DiT's device."""
    before = set(_block_linears(dit))
    adapter = load_speech_model(path, dit)
    dit.attach_audio(adapter)
    reference = getattr(dit.blocks[0].self_attn.q, "weight", None)      # GGUF layers hold no plain weight
    storage = reference.dtype if isinstance(reference, torch.Tensor) else None
    device = dit.device
    added = {n: m for n, m in _block_linears(dit).items() if n not in before}
    with torch.no_grad():
        for module in added.values():
            module.to(device)
            if storage is not None and is_fp8(storage) and module.weight.dtype != storage:
                weight, scale = quantize_scaled_fp8(module.weight, storage)
                module.weight = torch.nn.Parameter(weight, requires_grad=False)
                module.weight_scale = scale.to(device)
        adapter.to(device)
    return adapter
