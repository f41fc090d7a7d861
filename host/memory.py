"""Moving model weights off the compute device: the report both hosts return, and the standalone way.

A MODEL value is a patcher; a CLIP or VAE value carries one in `.patcher`. Both hosts accept
either. The ComfyUI way lives in comfy_memory.py (it must go through ComfyUI's model manager);
the standalone way asks the stand-in patcher (host/graph_values.py) to unload itself.
Also here, for both hosts: `loader_source`, the files a host loader recorded on a patcher (the
file-identity DRAM key of a CLIP no Slipstream loader registered).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Residency:
    """Where a model's weights are before an offload, and how many bytes would land in RAM."""

    total_bytes: int            # all weight bytes (patcher.model_size())
    device_bytes: int           # bytes currently on the compute device
    load_device: str
    offload_device: str
    dynamic: bool               # ComfyUI Dynamic VRAM patcher: RAM copy is mmap/pinned buffers already
    managed: bool               # the host's model manager tracks it (ComfyUI: in current_loaded_models)

    @property
    def same_device(self) -> bool:
        """--gpu-only/--highvram or CPU mode: 'offloading' moves nothing anywhere."""
        return self.load_device == self.offload_device

    @property
    def new_ram_bytes(self) -> int:
        """Bytes an offload adds to host RAM: none when dynamic, same-device or already offloaded."""
        if self.dynamic or self.same_device:
            return 0
        return self.device_bytes


@dataclass(frozen=True)
class OffloadReport:
    """What an offload did, in words a user can trust: freed is 0 whenever nothing moved."""

    freed_bytes: int
    method: str                 # the API that did the work, or "none"
    message: str                # one honest sentence
    moved: bool

    def line(self) -> str:
        return f"Offload: {self.message} [method: {self.method}]"


def patcher_of(obj: Any) -> Any:
    """The patcher of a MODEL (itself) or of a CLIP/VAE (`.patcher`)."""
    patcher = getattr(obj, "patcher", obj)
    if not hasattr(patcher, "model") or not hasattr(patcher, "load_device"):
        raise TypeError(f"expected a MODEL, CLIP or VAE value with a model patcher, got {type(obj).__name__}")
    return patcher


def fmt_mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def standalone_residency(obj: Any) -> Residency:
    p = patcher_of(obj)
    loaded = int(p.loaded_size())
    return Residency(int(p.model_size()), loaded, str(p.load_device), str(p.offload_device),
                     dynamic=False, managed=True)


def standalone_offload(obj: Any) -> OffloadReport:
    """The stand-in patcher moves its own weights (the standalone host's model manager)."""
    p = patcher_of(obj)
    res = standalone_residency(obj)
    if res.same_device:
        return OffloadReport(0, "none", f"nothing freed: load and offload device are both {res.load_device}",
                             moved=False)
    if res.device_bytes == 0:
        return OffloadReport(0, "none", f"nothing freed: weights are already on {res.offload_device}",
                             moved=False)
    freed = int(p.unload())
    return OffloadReport(freed, "patcher.unload", f"moved {fmt_mib(freed)} of weights from {res.load_device} "
                         f"to {res.offload_device}", moved=freed > 0)


# ---------------------------------------------------------------- the files a host loader recorded


@dataclass(frozen=True)
class LoaderSource:
    """The files (and the other arguments, as plain text) a host loader recorded for rebuilding a model."""

    factory: str                  # module.qualname of the recorded loader function
    paths: tuple[str, ...]
    options: tuple[str, ...]


def loader_source(obj: Any) -> LoaderSource | None:
    """What a MODEL/CLIP/VAE's patcher says about the files it was loaded from, or None.

    ComfyUI releases after v0.8.0 let loaders record `patcher.cached_patcher_init = (factory, args)`
    so that a model can be rebuilt (multi-GPU clones); its arguments name the checkpoint files, as
    one path or a list of paths. v0.8.0's comfy.sd.CLIP and ModelPatcher keep no file at all, so
    there (and for any loader that records nothing) this is None and the caller falls back to a
    fingerprint of the weights. Arguments that are not files are kept as plain text only (numbers,
    strings, enum names, devices, dtypes; other objects by type name), so no memory address can
    make the same load look different from one run to the next.
    """
    init = getattr(patcher_of(obj), "cached_patcher_init", None)
    if not (isinstance(init, tuple) and len(init) == 2 and callable(init[0]) and isinstance(init[1], (tuple, list))):
        return None
    paths: list[str] = []
    options: list[str] = []
    for arg in init[1]:
        files = _files_in(arg)
        if files:
            paths += files
        else:
            options.append(_plain(arg))
    if not paths:
        return None
    fn = init[0]
    factory = f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    return LoaderSource(factory, tuple(paths), tuple(options))


def _files_in(arg: Any) -> list[str]:
    """[arg] if it names an existing file, every element if it is a list of such, else []."""
    if isinstance(arg, (str, os.PathLike)):
        return [os.fspath(arg)] if os.path.isfile(arg) else []
    if isinstance(arg, (list, tuple)) and arg and all(isinstance(a, (str, os.PathLike)) for a in arg):
        return [os.fspath(a) for a in arg] if all(os.path.isfile(a) for a in arg) else []
    return []


def _plain(value: Any) -> str:
    """A deterministic text for a recorded loader argument (see loader_source)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_plain(k)}: {_plain(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    if type(value).__name__ in ("device", "dtype"):          # torch.device / torch.dtype print stably
        return str(value)
    return f"<{type(value).__name__}>"
