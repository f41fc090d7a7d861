"""Load CLIP (keyed) and Load Dual CLIP (keyed): core ComfyUI's CLIP loaders, with a DRAM cache key.

Why they exist: core Load CLIP returns a CLIP that names no file, so Offload CLIP to DRAM can keep
it only by a key derived from its weights and only weakly (no loader could ever ask for it again).
These loaders take the same inputs as core CLIPLoader / DualCLIPLoader (ComfyUI v0.8.0) and hand
the loading itself to ComfyUI (host.load_clip_files); what they add is the file-identity key
(kernels/dram.py: path, size, mtime_ns of every file + type + device) through `load_keyed`. After
Offload CLIP has cached the CLIP under that key, the next load of the same files with the same
options is served from RAM: no disk read, no rebuild.

IS_CHANGED returns that key, so ComfyUI re-runs the loader when a file is replaced (core's loader
would keep serving the old CLIP from its cache) and otherwise keeps everything downstream cached.
"""

from __future__ import annotations

import logging

from ..host import list_models, load_clip_files, model_path
from ..kernels import dram

log = logging.getLogger("slipstream.memory")

CATEGORY = "Slipstream/Memory"
FOLDER = "text_encoders"

# The `type` choices of ComfyUI v0.8.0's core loaders (nodes.py), in its order.
SINGLE_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
                "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2",
                "ovis"]
DUAL_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image", "hunyuan_video_15", "kandinsky5",
              "kandinsky5_image", "ltxv", "newbie"]
DEVICES = ["default", "cpu"]

_RECIPES_SINGLE = ("stable_diffusion: clip-l; stable_cascade: clip-g; sd3: t5 xxl / clip-g / clip-l; stable_audio: "
                   "t5 base; mochi: t5 xxl; cosmos: old t5 xxl; lumina2: gemma 2 2B; wan: umt5 xxl; hidream: "
                   "llama-3.1 or t5; omnigen2: qwen vl 2.5 3B")
_RECIPES_DUAL = ("sdxl: clip-l, clip-g; sd3: clip-l, clip-g / clip-l, t5 / clip-g, t5; flux: clip-l, t5; hidream: "
                 "t5 and/or llama; hunyuan_image: qwen2.5vl 7b and byt5 small; newbie: gemma-3-4b-it, jina clip v2")
_KEYED = ("Offload CLIP to DRAM keeps the CLIP in RAM under this file key, so the next run with the same files is "
          "served from RAM instead of disk.")


def _file_choices() -> list[str]:
    return list_models(FOLDER) or ["(put text encoder files in models/text_encoders)"]


def _device_input() -> tuple:
    return (DEVICES, {"advanced": True, "tooltip": "default: ComfyUI's text-encoder device; cpu: load and run the "
                                                  "text encoder on the CPU (it then never takes VRAM)."})


def _load(names: list[str], clip_type: str, device: str, node: str):
    """(CLIP,) through the DRAM cache: file key first, ComfyUI's loader only on a miss."""
    if device not in DEVICES:
        raise ValueError(f"{node}: device must be one of {', '.join(DEVICES)}, got {device!r}")
    paths = [model_path(FOLDER, name) for name in names]
    loaded = dram.load_keyed("clip", paths, lambda: load_clip_files(paths, clip_type, device),
                             lambda clip: clip.patcher.model, type=clip_type, device=device)
    log.info("[Slipstream] %s %s: %s", node, loaded.key,
             {"ram": "served from the DRAM cache (no disk read)", "live": "the CLIP loaded before is still alive",
              "disk": "loaded from disk"}[loaded.source])
    return (loaded.obj,)


def _changed(names: list[str], clip_type: str, device: str) -> str:
    """The file key (changes when a file does); '' when a file is missing, so the load itself says so."""
    try:
        return dram.dram_key("clip", [model_path(FOLDER, name) for name in names], type=clip_type, device=device)
    except (OSError, ValueError):
        return ""


class SlipstreamCLIPLoaderKeyed:
    """SlipstreamCLIPLoaderKeyed: core Load CLIP with a file-identity DRAM key."""

    DESCRIPTION = ("Loads a text encoder exactly like core Load CLIP (ComfyUI's own loader does the work) and gives "
                   "it a stable DRAM cache key from the file (path, size, modification time) and the options. "
                   + _KEYED + " Recipes: " + _RECIPES_SINGLE + ".")
    CATEGORY = CATEGORY
    FUNCTION = "load_clip"
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The CLIP, as core Load CLIP builds it, registered under its file key (Offload CLIP's "
                       "dram_id).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_name": (_file_choices(), {"tooltip": "The text encoder file in models/text_encoders."}),
                "type": (list(SINGLE_TYPES), {"tooltip": "The model family the encoder is for (as in core Load "
                                                         "CLIP); part of the cache key."}),
            },
            "optional": {"device": _device_input()},
        }

    @classmethod
    def IS_CHANGED(cls, clip_name, type, device="default"):
        return _changed([clip_name], type, device)

    def load_clip(self, clip_name, type="stable_diffusion", device="default") -> tuple:
        return _load([clip_name], type, device, "Load CLIP (keyed)")


class SlipstreamDualCLIPLoaderKeyed:
    """SlipstreamDualCLIPLoaderKeyed: core DualCLIPLoader with a file-identity DRAM key."""

    DESCRIPTION = ("Loads two text encoders into one CLIP exactly like core DualCLIPLoader (ComfyUI's own loader does "
                   "the work) and gives it a stable DRAM cache key from both files (path, size, modification time, "
                   "in order) and the options. " + _KEYED + " Recipes: " + _RECIPES_DUAL + ".")
    CATEGORY = CATEGORY
    FUNCTION = "load_clip"
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The CLIP, as core DualCLIPLoader builds it, registered under its file key (Offload CLIP's "
                       "dram_id).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_name1": (_file_choices(), {"tooltip": "The first text encoder file (models/text_encoders)."}),
                "clip_name2": (_file_choices(), {"tooltip": "The second text encoder file (models/text_encoders)."}),
                "type": (list(DUAL_TYPES), {"tooltip": "The model family the pair is for (as in core "
                                                       "DualCLIPLoader); part of the cache key."}),
            },
            "optional": {"device": _device_input()},
        }

    @classmethod
    def IS_CHANGED(cls, clip_name1, clip_name2, type, device="default"):
        return _changed([clip_name1, clip_name2], type, device)

    def load_clip(self, clip_name1, clip_name2, type, device="default") -> tuple:
        return _load([clip_name1, clip_name2], type, device, "Load Dual CLIP (keyed)")
