"""ComfyUI side of the keyed CLIP loaders and of the weights key (imported only inside ComfyUI).

Loading is ComfyUI's own: `comfy.sd.load_clip` with the same arguments core Load CLIP / DualCLIPLoader
pass, so a keyed loader builds exactly the CLIP the core node would. Only the DRAM key is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import comfy.sd
import folder_paths
import torch


def load_clip_files(paths: Sequence[str], clip_type: str, device: str = "default") -> Any:
    """A comfy.sd.CLIP from one or more text-encoder files, as core CLIPLoader/DualCLIPLoader build it."""
    kind = getattr(comfy.sd.CLIPType, clip_type.upper(), None)
    if kind is None:
        known = ", ".join(t.name.lower() for t in comfy.sd.CLIPType)
        raise ValueError(f"CLIP type '{clip_type}' is not one this ComfyUI knows ({known}). Pick another 'type'.")
    model_options: dict[str, Any] = {}
    if device == "cpu":
        model_options["load_device"] = model_options["offload_device"] = torch.device("cpu")
    return comfy.sd.load_clip(ckpt_paths=list(paths), embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=kind, model_options=model_options)


def clip_weights(clip: Any) -> list[tuple[str, torch.Tensor]]:
    """The CLIP's own weights, without patches: where ComfyUI patched a weight in place (a LoRA on a
    loaded clone) its patcher keeps the original in `backup`, shared by every clone; take that one,
    so a CLIP's weights key does not depend on which LoRA happened to be applied when it was offloaded."""
    patcher = clip.patcher
    backup = getattr(patcher, "backup", None) or {}
    weights = []
    for name, tensor in patcher.model.state_dict(keep_vars=True).items():
        saved = backup.get(name)
        original = getattr(saved, "weight", None) if saved is not None else None
        weights.append((name, original if isinstance(original, torch.Tensor) else tensor))
    return weights
