"""The ComfyUI host: the same interface as standalone.py, mapped onto ComfyUI's own modules.

Imported only when ComfyUI is running (host/__init__.py decides), so importing ComfyUI here at
module level is safe. Anything that differs between ComfyUI versions is feature-detected.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

from . import paths
from .progress_hooks import add_progress_hook, notify  # noqa: F401  (re-exported)

NAME = "comfyui"


def register_model_folder(key: str, subdir: str, extensions: Iterable[str]) -> None:
    """Add models/<subdir> under `key` with its own extension filter, keeping any user-configured paths."""
    default = os.path.join(folder_paths.models_dir, subdir)
    exts = {e.lower() for e in extensions}
    if key in folder_paths.folder_names_and_paths:
        dirs, old_exts = folder_paths.folder_names_and_paths[key]
        if default not in dirs:
            dirs.append(default)
        folder_paths.folder_names_and_paths[key] = (dirs, set(old_exts) | exts)
    else:
        folder_paths.folder_names_and_paths[key] = ([default], exts)


def model_folders(key: str) -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(key))
    except KeyError:
        return []


def list_models(key: str) -> list[str]:
    try:
        return list(folder_paths.get_filename_list(key))
    except KeyError:
        return []


def model_path(key: str, name: str) -> str:
    found = folder_paths.get_full_path(key, name) if key in folder_paths.folder_names_and_paths else None
    if found is None:
        raise paths.missing_model_error(key, name, list_models(key), model_folders(key))
    return found


def output_dir() -> str:
    return folder_paths.get_output_directory()


def temp_dir() -> str:
    return folder_paths.get_temp_directory()


def input_dir() -> str:
    return folder_paths.get_input_directory()


def request_interrupt() -> None:
    mm.interrupt_current_processing(True)


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()


def interrupt_exception_types() -> tuple[type[BaseException], ...]:
    return (mm.InterruptProcessingException,)


def clear_stale_interrupt() -> None:
    """Nothing to do: ComfyUI clears the interrupt flag itself when each prompt starts, and clearing it
    here (inside a prompt) could swallow a Cancel the user just pressed."""


class ProgressBar:
    """ComfyUI's ProgressBar (websocket progress, per-node state) plus an explicit interrupt check."""

    def __init__(self, total: int, desc: str | None = None):
        self._bar = comfy.utils.ProgressBar(max(int(total), 1))
        self.total = self._bar.total
        self.current = 0

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        self._bar.update_absolute(int(value), total, preview)
        self.total = self._bar.total
        self.current = self._bar.current
        notify(self.current, self.total)
        check_interrupt()

    def update(self, n: int = 1) -> None:
        self.update_absolute(self.current + n)

    def close(self) -> None:
        pass


def latent_previewer(kind: str):
    """fn(raw latent) -> a preview for ProgressBar.update_absolute, via ComfyUI's latent previewer
    (its --preview-method) with the latent format of `kind` ("wan21"); None when previews are off."""
    import comfy.latent_formats
    import latent_preview

    formats = {"wan21": comfy.latent_formats.Wan21}
    previewer = latent_preview.get_previewer(mm.get_torch_device(), formats[kind]())
    if previewer is None:
        return None
    return lambda x0: previewer.decode_latent_to_preview_image("JPEG", x0)


def compute_device() -> torch.device:
    return mm.get_torch_device()


def offload_device() -> torch.device:
    return mm.unet_offload_device()


def text_encoder_device() -> torch.device:
    return mm.text_encoder_device()


# ---------------------------------------------------------------- modules under ComfyUI's model manager


def managed_home() -> torch.device:
    """Where to build a module ComfyUI will manage: its offload device, so nothing sits on the GPU
    before ComfyUI has counted it."""
    return mm.unet_offload_device()


def manage_module(module: torch.nn.Module):
    """A ModelPatcher around a plain module, so ComfyUI loads, counts and frees it like its own models."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def load_managed(items: Iterable) -> None:
    """Load managed modules onto the GPU through ComfyUI, which first frees room by unloading other
    models. Fully: our modules are plain torch layers that cannot run with some weights left in RAM."""
    patchers = list(items)
    if patchers:
        mm.load_models_gpu(patchers, force_full_load=True)


def intermediate_device() -> torch.device:
    return mm.intermediate_device()


def vram_info(device: torch.device | None = None) -> tuple[int, int] | None:
    device = device or mm.get_torch_device()
    if device.type == "cpu":
        return None
    return int(mm.get_free_memory(device)), int(mm.get_total_memory(device))


def soft_empty_cache() -> None:
    mm.soft_empty_cache()


# ---------------------------------------------------------------- memory family (CLIP-to-DRAM offload)

from . import comfy_memory as _comfy_memory  # noqa: E402


def model_residency(obj):
    """Where a MODEL/CLIP/VAE's weights are, per ComfyUI's model manager (clones included)."""
    return _comfy_memory.residency(mm, obj)


def offload_model_weights(obj):
    """Unload a MODEL/CLIP/VAE from VRAM through ComfyUI's model manager; says honestly what moved."""
    return _comfy_memory.offload(mm, obj)


def loaded_models_summary():
    """ComfyUI's current_loaded_models as LoadedModelInfo rows."""
    return _comfy_memory.loaded_models_summary(mm)


def memory_flags() -> dict[str, str]:
    return _comfy_memory.memory_flags(mm)


def load_clip_files(paths, clip_type: str, device: str = "default"):
    """A CLIP built by ComfyUI's own loader from text-encoder files (see host/comfy_clip.py)."""
    from . import comfy_clip

    return comfy_clip.load_clip_files(paths, clip_type, device)


def clip_weights(clip):
    """(name, tensor) of a CLIP's weights with ComfyUI's in-place patches undone (see host/comfy_clip.py)."""
    from . import comfy_clip

    return comfy_clip.clip_weights(clip)


# ---------------------------------------------------------------- video family (Video Combine)


def metadata_disabled() -> bool:
    """True when ComfyUI runs with --disable-metadata: outputs carry no prompt/workflow."""
    from comfy.cli_args import args

    return bool(getattr(args, "disable_metadata", False))


def video_value(path: str, *, frame_rate, width: int, height: int, frame_count: int, frames=None):
    """Core VIDEO for a saved file (see host/comfy_video.py); None on ComfyUI builds without VIDEO."""
    from . import comfy_video

    return comfy_video.video_value(path, frame_rate, frames, width=width, height=height, frame_count=frame_count)


# ---------------------------------------------------------------- Anima family (context tokens)


def load_model_fully(patcher) -> None:
    """Load every weight of a MODEL onto its device (a trainer reads them all every step)."""
    mm.load_models_gpu([patcher], force_full_load=True)


def bundled_tokenizer_dirs() -> list[str]:
    """Folders where this ComfyUI keeps its tokenizer files (qwen25_tokenizer/, t5_tokenizer/, ...)."""
    return [os.path.join(os.path.dirname(os.path.abspath(comfy.utils.__file__)), "text_encoders")]


# ---------------------------------------------------------------- Wan family (models ComfyUI does not manage)


def make_room(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until `nbytes` are free on `device` (our Wan DiT is not
    one of its managed models, so it would not do this by itself before we move weights there)."""
    if device.type == "cpu" or nbytes <= 0:
        return
    mm.free_memory(int(nbytes), device)


# ---------------------------------------------------------------- int8 family (W8A8 loading)


def load_int8_diffusion_model(sd, plan, metadata=None, on_layer=None, own_build=None):
    """(MODEL, QuantReport): ComfyUI builds the architecture; our fresh ops class quantizes its Linears.
    (`own_build` is for plain processes: ComfyUI knows every architecture the loader accepts.)"""
    from . import comfy_quant

    return comfy_quant.load_int8_diffusion_model(sd, plan, metadata, on_layer)


def core_wan_model(sd, plan, dtype, metadata=None, on_layer=None):
    """(MODEL, QuantReport): ComfyUI's own Wan architecture with our int8/fp8 Linears (host/comfy_wan.py)."""
    from . import comfy_wan

    return comfy_wan.core_wan_model(sd, plan, dtype, metadata, on_layer)


def core_lora(model, lora_sd, strength, keep):
    """(MODEL clone, patches added, LoRA modules found) through ComfyUI's own LoRA loading."""
    from . import comfy_wan

    return comfy_wan.add_lora(model, lora_sd, strength, keep)


def core_block_swap(model, swapped, prefetch, non_blocking):
    """(MODEL clone whose swapped blocks wait on the offload device, the swap state)."""
    from . import comfy_wan

    return comfy_wan.block_swap(model, swapped, prefetch, non_blocking)


def anima_support():
    """host/comfy_anima.py: ComfyUI's own Anima loaders where this version has them, and the pieces to
    assemble Anima from ComfyUI's Cosmos DiT where it does not (v0.8.0)."""
    from . import comfy_anima

    return comfy_anima


def clip_value(text_encoder, tokenize, encode, load_device, offload_device):
    """A CLIP around our text encoder whose weights ComfyUI's model manager loads and offloads."""
    from . import comfy_anima

    return comfy_anima.managed_clip(text_encoder, tokenize, encode)


from . import graph_values as _values  # noqa: E402

model_value = _values.ModelPatcher            # (module, load_device, offload_device) -> MODEL
vae_value = _values.VAE                       # (module, encode, decode, load, offload, channels, ratio) -> VAE


def diffusion_state_dict(model):
    """A MODEL's diffusion-model tensors with its LoRA patches baked in (for saving)."""
    from . import comfy_quant

    return comfy_quant.diffusion_state_dict(model)


# ---------------------------------------------------------------- notices (host.notice)

_node_texts: dict[tuple[str, str], list[str]] = {}


def show_node_text(message: str) -> None:
    """Show a notice as the running node's UI text (the text ComfyUI draws on the node).

    The frontend replaces a node's text with each message, so the notices of one node in one prompt
    are kept and sent together. Outside a node's execution (or without a server) only the log has it.
    """
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return
    context = get_executing_context()
    server = getattr(PromptServer, "instance", None)
    if context is None or server is None:
        return
    key = (str(context.prompt_id), str(context.node_id))
    if len(_node_texts) > 256:
        _node_texts.clear()
    lines = _node_texts.setdefault(key, [])
    lines.append(message)
    server.send_progress_text("\n".join(lines), context.node_id)
