"""The readable memory report the memory nodes return (`memory_stats`), and the rows it lists.

Why apart from kernels/dram.py: the cache decides what stays in RAM; this module only renders what
the cache, the RAM probe and the host say, so either can change without touching the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .dram import DramCache, GiB, MiB, count_entries, gib_text
from .sysmem import RamInfo, probe_ram


@dataclass(frozen=True)
class LoadedModelInfo:
    """One model the host's model manager has loaded (ComfyUI's current_loaded_models)."""

    name: str
    device: str
    loaded_bytes: int
    total_bytes: int
    dynamic: bool | None = None


RULE = "=" * 50


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _cuda_detail() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    dev = torch.cuda.current_device()
    return (f"; torch allocated {gib_text(torch.cuda.memory_allocated(dev))}, "
            f"reserved {gib_text(torch.cuda.memory_reserved(dev))}")


def _cuda_vram() -> tuple[int, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def summary_line(cache: DramCache | None, vram: tuple[int, int] | None, ram: RamInfo) -> str:
    """One readable line: VRAM (when a GPU exists), RAM, DRAM cache usage."""
    parts = []
    if vram is not None:
        free, total = vram
        parts.append(f"VRAM {(total - free) / GiB:.2f}/{total / GiB:.2f} GiB used, {free / GiB:.2f} free")
    parts.append(f"RAM {ram.used / GiB:.1f}/{ram.total / GiB:.1f} GiB used, {ram.available / GiB:.1f} available")
    if cache is not None:
        n = len(cache)
        parts.append(f"DRAM cache {count_entries(n)}, "
                     f"{cache.held_bytes() / GiB:.2f}/{cache.budget_bytes / GiB:.2f} GiB")
    return " | ".join(parts)


def memory_stats(cache: DramCache | None = None, *, vram: tuple[int, int] | None | str = "auto",
                 loaded_models: Iterable[LoadedModelInfo] | None = None, flags: dict[str, str] | None = None,
                 headline: Iterable[str] = (), ram: RamInfo | None = None) -> str:
    """The readable memory block: headline, one-line summary, VRAM, RAM, DRAM cache, loaded models, mode.

    vram: (free, total) bytes from the host, None for no GPU, "auto" to ask torch.cuda.
    loaded_models: the host's loaded models, None when the host does not track them.
    """
    ram = ram or (cache.probe_ram() if cache is not None else probe_ram())
    if vram == "auto":
        vram = _cuda_vram()
    lines = [RULE, "MEMORY STATUS", RULE, *headline, summary_line(cache, vram, ram)]
    if vram is not None:
        free, total = vram
        lines.append(f"VRAM: {gib_text(total - free)} / {gib_text(total)} used (free {gib_text(free)}{_cuda_detail()})")
    else:
        lines.append("VRAM: no GPU in use (CPU only)")
    limit = (f"cgroup v{ram.cgroup.version} limit {gib_text(ram.cgroup.limit)}" if ram.cgroup is not None
             else "no cgroup limit")
    lines.append(f"RAM:  {gib_text(ram.used)} / {gib_text(ram.total)} used (available {gib_text(ram.available)}; {limit}; "
                 f"host available {gib_text(ram.host_available)})")
    if cache is not None:
        entries = cache.entries()
        lines.append(f"DRAM cache ({count_entries(len(entries))}, "
                     f"{gib_text(cache.held_bytes())} of {gib_text(cache.budget_bytes)} budget, "
                     f"headroom {gib_text(cache.headroom_bytes)}):" if entries else
                     f"DRAM cache: empty (budget {gib_text(cache.budget_bytes)}, headroom {gib_text(cache.headroom_bytes)})")
        for e in reversed(entries):      # most recently used first
            hold = "weak ref" if e.weak else "held"
            extra = f", {e.note}" if e.note else ""
            lines.append(f"  [{e.kind.upper()}] {e.key}  ({e.nbytes / MiB:.0f} MiB, {hold}, hits {e.hits}, "
                         f"cached {_age(e.age_s)} ago{extra})")
    if loaded_models is None:
        lines.append("Loaded models: not tracked by this host")
    else:
        models = list(loaded_models)
        lines.append(f"Loaded models ({len(models)}):" if models else "Loaded models: none")
        for i, m in enumerate(models):
            dyn = " [dynamic]" if m.dynamic else ""
            lines.append(f"  [{i}] {m.name} on {m.device}: {m.loaded_bytes / MiB:.0f} MiB loaded, "
                         f"{(m.total_bytes - m.loaded_bytes) / MiB:.0f} MiB offloaded{dyn}")
    if flags:
        lines.append("Mode: " + ", ".join(f"{k}={v}" for k, v in flags.items()))
    lines.append(RULE)
    return "\n".join(lines)
