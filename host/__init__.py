"""The one door to ComfyUI.

Every node talks to its environment through these functions, so the same node runs inside
ComfyUI and in a plain Python process. The implementation is picked once, at import:
`comfyui` when ComfyUI is running this process (its `folder_paths` and `comfy.model_management`
are already imported), `standalone` otherwise. SLIPSTREAM_HOST=comfyui|standalone overrides it.

Interface (both implementations provide each name):
  NAME                                  "comfyui" or "standalone"
  register_model_folder(key, subdir, extensions)
  model_folders(key) / list_models(key) / model_path(key, name)   ModelNotFoundError lists close matches
  output_dir() / temp_dir() / input_dir()
  ProgressBar(total)                    .update(n=1), .update_absolute(v, total=None, preview=None); checks interrupt
  latent_previewer(kind)                fn(raw latent) -> preview for update_absolute, or None (off / standalone)
  check_interrupt() / request_interrupt() / interrupt_exception_types()
  add_progress_hook(fn)                 observe (value, total) updates
  compute_device() / offload_device() / text_encoder_device() / intermediate_device()
  vram_info(device=None) -> (free, total) | None
  soft_empty_cache()
  notice(node, message)                 log + the node's UI text inside ComfyUI; add_notice_hook(fn) observes
  clear_stale_interrupt()               forget an interrupt requested while nothing ran (start of a run)
  managed_home() / manage_module(module) / load_managed(handles)   modules under the model manager
  model_value / clip_value / vae_value  MODEL, CLIP, VAE values around modules of our own
Plus, defined here for both: save_target(prefix, ...), publish(...), staged_file(...), counter_of(...),
staged_folder(target) / publish_folder(tmp_dir, target) for results made of many files.
"""

from __future__ import annotations

import os
import sys

from . import notices, paths
from .notices import add_notice_hook  # noqa: F401  (public API)
from .paths import (  # noqa: F401  (public API)
    BadPrefixError,
    ModelNotFoundError,
    OutputFolderError,
    SaveTarget,
    counter_of,
    publish,
    publish_folder,
    staged_file,
    staged_folder,
)


def _running_inside_comfyui() -> bool:
    choice = os.environ.get("SLIPSTREAM_HOST", "").strip().lower()
    if choice in ("comfyui", "standalone"):
        return choice == "comfyui"
    return "folder_paths" in sys.modules and "comfy.model_management" in sys.modules


if _running_inside_comfyui():
    from . import comfyui as _impl
else:
    from . import standalone as _impl

NAME: str = _impl.NAME
register_model_folder = _impl.register_model_folder
model_folders = _impl.model_folders
list_models = _impl.list_models
model_path = _impl.model_path
output_dir = _impl.output_dir
temp_dir = _impl.temp_dir
input_dir = _impl.input_dir
ProgressBar = _impl.ProgressBar
latent_previewer = _impl.latent_previewer
check_interrupt = _impl.check_interrupt
request_interrupt = _impl.request_interrupt
interrupt_exception_types = _impl.interrupt_exception_types
clear_stale_interrupt = _impl.clear_stale_interrupt
add_progress_hook = _impl.add_progress_hook
compute_device = _impl.compute_device
offload_device = _impl.offload_device
text_encoder_device = _impl.text_encoder_device
intermediate_device = _impl.intermediate_device
vram_info = _impl.vram_info
soft_empty_cache = _impl.soft_empty_cache
# modules of ours under the host's model manager (ComfyUI: one ModelPatcher each, loaded via load_models_gpu)
managed_home = _impl.managed_home                    # () -> device to build a managed module on
manage_module = _impl.manage_module                  # (nn.Module) -> handle for load_managed
load_managed = _impl.load_managed                    # (handles) -> None: on the compute device, counted


def notice(node: str, message: str) -> None:
    """Tell the user something that is not an error (a size rounded, sound dropped): the log, plus the
    node's UI text inside ComfyUI, so it reaches the user and not only the console."""
    line = notices.emit(node, message)
    _impl.show_node_text(line)


def save_target(prefix: str, temp: bool = False, width: int = 0, height: int = 0,
                node: str = "Save") -> SaveTarget:
    """Resolve a node's filename_prefix under the output folder (or temp, for previews).

    When a symbolic link leads the file out of that folder, the node says where it really goes.
    """
    if temp:
        target = paths.save_target(temp_dir(), prefix, "temp", width, height)
    else:
        target = paths.save_target(output_dir(), prefix, "output", width, height)
    note = paths.link_note(target)
    if note is not None:
        notice(node, note)
    return target


check_prefix = paths.check_prefix                    # (prefix, input_name) -> prefix; BadPrefixError if unusable


def prefix_problem(prefix, input_name: str = "filename_prefix") -> str | bool:
    """VALIDATE_INPUTS' answer for a filename prefix: True, or why no file could be saved under it."""
    if prefix is None:   # linked: checked when the node runs
        return True
    try:
        paths.check_prefix(prefix, input_name)
        if isinstance(prefix, str):
            paths.save_target(output_dir(), prefix, "output")   # escapes, no name, length after patterns
    except BadPrefixError as exc:
        return str(exc)
    return True


def ui_file(path: str, target: SaveTarget) -> dict[str, str]:
    """The {filename, subfolder, type} entry ComfyUI's frontend uses to fetch a saved file via /view."""
    return {"filename": os.path.basename(path), "subfolder": target.subfolder, "type": target.folder_type}


# memory family (CLIP-to-DRAM offload): see host/memory.py and host/comfy_memory.py
model_residency = _impl.model_residency              # (obj) -> Residency
offload_model_weights = _impl.offload_model_weights  # (obj) -> OffloadReport
loaded_models_summary = _impl.loaded_models_summary  # () -> list[LoadedModelInfo] | None
memory_flags = _impl.memory_flags                    # () -> dict[str, str]
load_clip_files = _impl.load_clip_files              # (paths, clip_type, device) -> CLIP (ComfyUI's own loader)
clip_weights = _impl.clip_weights                    # (CLIP) -> [(name, tensor)] without in-place patches
from .memory import LoaderSource, loader_source  # noqa: E402,F401  (obj) -> files a host loader recorded, or None

# video family (Video Combine): see host/comfy_video.py
metadata_disabled = _impl.metadata_disabled          # () -> bool (ComfyUI's --disable-metadata)
video_value = _impl.video_value                      # (path, *, frame_rate, width, height, frame_count, frames=None)
from .comfy_video import decode_latent_chunks  # noqa: E402,F401  (vae, LATENT, chunk) -> (n, IMAGE chunks)

# MODEL / CLIP / VAE values around modules of our own (host/graph_values.py)
model_value = _impl.model_value                      # (module, load_device, offload_device) -> MODEL
clip_value = _impl.clip_value                        # (text_encoder, tokenize, encode, load, offload) -> CLIP
vae_value = _impl.vae_value                          # (module, encode, decode, load, offload, channels, ratio) -> VAE

# Anima family (context tokens)
anima_support = _impl.anima_support                    # () -> ComfyUI's Anima loaders/assembly (comfy_anima) | None
load_model_fully = _impl.load_model_fully              # (MODEL) -> None: all weights on the load device
bundled_tokenizer_dirs = _impl.bundled_tokenizer_dirs  # () -> [dirs holding qwen25_tokenizer/, t5_tokenizer/]

# Wan family: make room on a device for weights the host's model manager does not track
make_room = _impl.make_room                          # (nbytes, device) -> None
# int8 family (W8A8 loading): see host/comfy_quant.py
# (sd, plan, metadata, on_layer, own_build) -> (MODEL, report) | None; own_build(sd) -> (MODEL, report) builds
# one of our own architectures where the host has none (a plain process)
load_int8_diffusion_model = _impl.load_int8_diffusion_model
diffusion_state_dict = _impl.diffusion_state_dict            # (MODEL) -> state dict with patches baked in
# Wan as ComfyUI's own MODEL (host/comfy_wan.py): core architecture, our int8/fp8 Linears, block swap patches
core_wan_model = _impl.core_wan_model                # (sd, plan, dtype, metadata, on_layer) -> (MODEL, report)
core_lora = _impl.core_lora                          # (MODEL, lora_sd, strength, keep) -> (MODEL, added, found)
core_block_swap = _impl.core_block_swap              # (MODEL, swapped, prefetch, non_blocking) -> (MODEL, swap)
