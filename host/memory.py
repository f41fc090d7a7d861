"""Moving model weights off the compute device: the report both hosts return, and the standalone way.

A MODEL value is a patcher; a CLIP or VAE value carries one in `.patcher`. Both hosts accept
either. The ComfyUI way lives in comfy_memory.py (it must go through ComfyUI's model manager);
the standalone way asks the stand-in patcher (host/graph_values.py) to unload itself.
"""

from __future__ import annotations

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
