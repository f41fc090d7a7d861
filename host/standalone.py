"""The plain-process host: what ComfyUI would provide, built on torch, tqdm and the file system.

Used by the headless runner, the benchmarks and the tests. Folders come from environment
variables read at call time (so a test can point them at a temporary directory):
SLIPSTREAM_MODELS (models root, os.pathsep-separated list allowed; default ./models),
SLIPSTREAM_OUTPUT (./output), SLIPSTREAM_TEMP (./temp), SLIPSTREAM_INPUT (./input) — run from
this pack's own checkout, the defaults are ./slipstream-data/<name> instead, because the
checkout's ./models folder is the package's Python code;
SLIPSTREAM_DEVICE (compute device; default cuda when available, else cpu).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import torch

from . import paths
from .progress_hooks import add_progress_hook, notify  # noqa: F401  (re-exported)

NAME = "standalone"

# Folder key -> sub-directories of each models root, as ComfyUI's folder_paths names them.
_FOLDER_DIRS: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "clip_vision": ("clip_vision",),
    "loras": ("loras",),
    "checkpoints": ("checkpoints",),
}
_FOLDER_EXTS: dict[str, frozenset[str]] = {}


class Interrupted(Exception):
    """Raised by check_interrupt() after request_interrupt(); ComfyUI raises its own type."""


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _default_dir(name: str) -> str:
    """./<name>, except inside this pack's own checkout, whose ./models is Python code, not weights."""
    cwd = os.getcwd()
    if os.path.samefile(cwd, _PACKAGE_ROOT):
        return os.path.join(cwd, "slipstream-data", name)
    return os.path.join(cwd, name)


def models_roots() -> list[str]:
    raw = os.environ.get("SLIPSTREAM_MODELS") or _default_dir("models")
    return [os.path.abspath(p) for p in raw.split(os.pathsep) if p]


def register_model_folder(key: str, subdir: str, extensions: Iterable[str]) -> None:
    """Declare a folder key of our own (e.g. 'mia' -> models/mia) with the extensions it lists."""
    _FOLDER_DIRS.setdefault(key, (subdir,))
    _FOLDER_EXTS[key] = frozenset(e.lower() for e in extensions)


# ComfyUI's main.py also lists these output sub-folders as model folders, so a model a workflow saves
# (e.g. Save INT8 Model into output/diffusion_models) can be loaded by the next workflow.
_OUTPUT_MODEL_DIRS = {"checkpoints": "checkpoints", "text_encoders": "clip", "vae": "vae",
                      "diffusion_models": "diffusion_models", "loras": "loras"}


def model_folders(key: str) -> list[str]:
    subdirs = _FOLDER_DIRS.get(key, (key,))
    folders = [os.path.join(root, sub) for root in models_roots() for sub in subdirs]
    if key in _OUTPUT_MODEL_DIRS:
        folders.append(os.path.join(output_dir(), _OUTPUT_MODEL_DIRS[key]))
    return folders


def list_models(key: str) -> list[str]:
    return paths.list_model_files(model_folders(key), _FOLDER_EXTS.get(key, paths.MODEL_EXTENSIONS))


def model_path(key: str, name: str) -> str:
    found = paths.find_model_file(model_folders(key), name)
    if found is None:
        raise paths.missing_model_error(key, name, list_models(key), model_folders(key))
    return found


def _dir_from_env(var: str, default: str) -> str:
    path = os.path.abspath(os.environ.get(var) or _default_dir(default))
    os.makedirs(path, exist_ok=True)
    return path


def output_dir() -> str:
    return _dir_from_env("SLIPSTREAM_OUTPUT", "output")


def temp_dir() -> str:
    return _dir_from_env("SLIPSTREAM_TEMP", "temp")


def input_dir() -> str:
    return _dir_from_env("SLIPSTREAM_INPUT", "input")


# ---------------------------------------------------------------- notices (host.notice)


def show_node_text(message: str) -> None:
    """A plain process has no node UI: the log line host.notice() writes is the whole notice."""


# ---------------------------------------------------------------- progress and interrupt

_interrupt = threading.Event()


def request_interrupt() -> None:
    """Ask the running node to stop at its next check (the runner wires SIGINT here)."""
    _interrupt.set()


def check_interrupt() -> None:
    """Raise Interrupted once per request, like ComfyUI's throw_exception_if_processing_interrupted."""
    if _interrupt.is_set():
        _interrupt.clear()
        raise Interrupted("Processing interrupted")


def interrupt_exception_types() -> tuple[type[BaseException], ...]:
    return (Interrupted,)


def latent_previewer(kind: str):
    """No previews outside ComfyUI (there is no frontend to show them)."""
    return None


def clear_stale_interrupt() -> None:
    """Forget a request made while nothing ran (a Ctrl-C between runs), so it cannot stop the next run."""
    _interrupt.clear()


class ProgressBar:
    """tqdm on a terminal, silent otherwise; every update checks for interruption."""

    def __init__(self, total: int, desc: str | None = None):
        self.total = max(int(total), 1)
        self.current = 0
        self._bar = None
        if sys.stderr.isatty() and os.environ.get("SLIPSTREAM_PROGRESS", "1") != "0":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, leave=False)

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        if total is not None:
            self.total = max(int(total), 1)
            if self._bar is not None:
                self._bar.total = self.total
        value = min(int(value), self.total)
        if self._bar is not None:
            self._bar.update(value - self.current)
        self.current = value
        notify(self.current, self.total)
        check_interrupt()

    def update(self, n: int = 1) -> None:
        self.update_absolute(self.current + n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------- devices and memory


def compute_device() -> torch.device:
    name = os.environ.get("SLIPSTREAM_DEVICE")
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def offload_device() -> torch.device:
    return torch.device("cpu")


def text_encoder_device() -> torch.device:
    return compute_device()


# ---------------------------------------------------------------- modules under the host's model manager


def managed_home() -> torch.device:
    """Where to build a module the host will manage: here it simply lives on the compute device."""
    return compute_device()


def manage_module(module: torch.nn.Module) -> torch.nn.Module:
    """Without ComfyUI there is no model manager: the module is its own handle."""
    return module


def load_managed(items: Iterable[torch.nn.Module]) -> None:
    """Put managed modules on the compute device before they run (a no-op once they are there)."""
    device = compute_device()
    for module in items:
        module.to(device)


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def vram_info(device: torch.device | None = None) -> tuple[int, int] | None:
    """(free, total) bytes of an accelerator, or None on CPU."""
    device = device or compute_device()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    return None


def soft_empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- memory family (CLIP-to-DRAM offload)

from . import memory as _memory  # noqa: E402


def model_residency(obj) -> _memory.Residency:
    """Where a MODEL/CLIP/VAE's weights are, and how many bytes an offload would add to RAM."""
    return _memory.standalone_residency(obj)


def offload_model_weights(obj) -> _memory.OffloadReport:
    """Move a MODEL/CLIP/VAE's weights to its offload device through its patcher; says what moved."""
    report = _memory.standalone_offload(obj)
    if report.moved:
        soft_empty_cache()
    return report


def loaded_models_summary():
    """None: the standalone host has no model manager that tracks loaded models."""
    return None


def memory_flags() -> dict[str, str]:
    return {"host": "standalone"}


class NeedsComfyUIError(RuntimeError):
    """A node that hands its work to ComfyUI's own code ran outside ComfyUI."""


def load_clip_files(paths, clip_type: str, device: str = "default"):
    """Refused: the keyed CLIP loaders delegate to ComfyUI's own CLIP loader, which a plain process lacks."""
    raise NeedsComfyUIError(
        f"Loading {', '.join(os.path.basename(str(p)) for p in paths)} as a '{clip_type}' CLIP needs ComfyUI: "
        "Load CLIP (keyed) and Load Dual CLIP (keyed) hand the loading to ComfyUI's own CLIP loader. Run the "
        "workflow inside ComfyUI, or use a family loader that builds its own encoder (Load Anima Text Encoder).")


def clip_weights(clip):
    """(name, tensor) of a CLIP's weights (standalone CLIPs carry no in-place patches)."""
    return list(clip.patcher.model.state_dict(keep_vars=True).items())


# ---------------------------------------------------------------- video family (Video Combine)


def metadata_disabled() -> bool:
    """SLIPSTREAM_DISABLE_METADATA=1 plays the part of ComfyUI's --disable-metadata."""
    return os.environ.get("SLIPSTREAM_DISABLE_METADATA", "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class SavedVideo:
    """The standalone VIDEO value: the file Video Combine wrote, with the accessors of ComfyUI's VideoInput
    that need no decoding (ComfyUI itself gets a real VideoFromFile; see host/comfy_video.py)."""

    path: str
    frame_rate: Fraction
    width: int
    height: int
    frame_count: int

    def get_stream_source(self) -> str:
        return self.path

    def get_dimensions(self) -> tuple[int, int]:
        return self.width, self.height

    def get_frame_rate(self) -> Fraction:
        return self.frame_rate

    def get_frame_count(self) -> int:
        return self.frame_count


def video_value(path: str, *, frame_rate, width: int, height: int, frame_count: int, frames=None) -> SavedVideo:
    return SavedVideo(path, Fraction(frame_rate), width, height, frame_count)


# ---------------------------------------------------------------- Anima family (context tokens)


def load_model_fully(patcher) -> None:
    """Load every weight of a MODEL onto its device (a trainer reads them all every step)."""
    patcher.load()


def bundled_tokenizer_dirs() -> list[str]:
    """No tokenizer files ship outside ComfyUI; loaders look beside the model files instead."""
    return []


# ---------------------------------------------------------------- Wan family (models ComfyUI does not manage)


def make_room(nbytes: int, device: torch.device) -> None:
    """No model manager here: nothing else holds device memory on our behalf."""


# ---------------------------------------------------------------- int8 family (W8A8 loading)


def load_int8_diffusion_model(sd, plan, metadata=None, on_layer=None, own_build=None):
    """`own_build(sd) -> (MODEL, report)`: a plain process has no architecture zoo, so the caller's own
    architecture is built (None without one)."""
    return None if own_build is None else own_build(sd)


def core_wan_model(sd, plan, dtype, metadata=None, on_layer=None):
    """Refused: a plain process has no ComfyUI architecture to build a core MODEL in."""
    raise NeedsComfyUIError("'Wan Model to core MODEL' builds ComfyUI's own Wan model and runs only inside "
                            "ComfyUI; outside it, sample the Wan model with the Wan Sampler.")


def core_lora(model, lora_sd, strength, keep):
    raise NeedsComfyUIError("core LoRA patches need ComfyUI's model patcher (run inside ComfyUI).")


def core_block_swap(model, swapped, prefetch, non_blocking):
    raise NeedsComfyUIError("block swap on a core MODEL needs ComfyUI's model patcher (run inside ComfyUI).")


def anima_support():
    """None: a plain process has no Anima of its own; the caller builds ours (see host/comfyui.py)."""
    return None


def clip_value(text_encoder, tokenize, encode, load_device, offload_device):
    """A CLIP around our text encoder, loaded and offloaded by its stand-in patcher."""
    return _values.CLIP(text_encoder, tokenize, encode, load_device, offload_device)


from . import graph_values as _values  # noqa: E402

model_value = _values.ModelPatcher            # (module, load_device, offload_device) -> MODEL
vae_value = _values.VAE                       # (module, encode, decode, load, offload, channels, ratio) -> VAE


def diffusion_state_dict(model):
    """A MODEL's diffusion-model tensors (standalone MODELs carry no pending patches)."""
    return model.model.diffusion_model.state_dict()
