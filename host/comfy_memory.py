"""Offloading a model through ComfyUI's own model manager, so its bookkeeping stays true.

Every function takes ComfyUI's `comfy.model_management` module as `mm`, so the logic is tested
against fake modules of several ComfyUI eras:

1. Act on the patcher ComfyUI actually manages: the entries of `mm.current_loaded_models` whose
   patcher is ours or a clone of ours (LoRA/clip-skip clones share the nn.Module).
2. load device == offload device (--gpu-only, --highvram, CPU mode): nothing can be freed; say so.
3. Prefer `mm.unload_model_and_clones(p, unload_additional_models=False)` (upstream).
4. Else `mm.free_memory(1e30, device, keep_loaded=[every other LoadedModel])` — keep_loaded must
   hold LoadedModel objects, since membership uses LoadedModel equality.
5. Else, for very old or unusual managers: `LoadedModel.model_unload()` + pop + `soft_empty_cache()`.

Never: `.to('cpu')` on the weights (ComfyUI would believe they are still loaded), a
monkey-patch of ComfyUI, `unload_all_models()`, or pinning on a dynamic patcher.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..kernels.dram import GiB
from ..kernels.dram_report import LoadedModelInfo
from .memory import OffloadReport, Residency, fmt_mib, patcher_of


def _is_dynamic(patcher: Any) -> bool:
    probe = getattr(patcher, "is_dynamic", None)
    return bool(probe()) if callable(probe) else False


def _targets(patcher: Any, loaded: Any) -> bool:
    other = loaded.model
    return other is not None and (other is patcher or patcher.is_clone(other))


def managed_entries(mm: Any, patcher: Any) -> list[tuple[int, Any]]:
    """(index, LoadedModel) of every entry ComfyUI holds for this patcher or one of its clones."""
    return [(i, lm) for i, lm in enumerate(mm.current_loaded_models) if _targets(patcher, lm)]


def residency(mm: Any, obj: Any) -> Residency:
    p = patcher_of(obj)
    return _residency(p, managed_entries(mm, p))


def _residency(p: Any, entries: list[tuple[int, Any]]) -> Residency:
    # Clones share the nn.Module and its loaded-bytes counter: take the largest, never the sum.
    device_bytes = max((int(lm.model_loaded_memory()) for _, lm in entries), default=int(p.loaded_size()))
    return Residency(int(p.model_size()), device_bytes, str(p.load_device), str(p.offload_device),
                     dynamic=_is_dynamic(p), managed=bool(entries))


def _free_memory_takes_keep_loaded(mm: Any) -> bool:
    fn = getattr(mm, "free_memory", None)
    if fn is None:
        return False
    try:
        return "keep_loaded" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def offload(mm: Any, obj: Any) -> OffloadReport:
    """Unload `obj`'s weights from the compute device the way ComfyUI itself would."""
    p = patcher_of(obj)
    entries = managed_entries(mm, p)   # one snapshot for the report and the unload
    res = _residency(p, entries)
    if res.same_device:
        return OffloadReport(0, "none", f"nothing freed: load and offload device are both {res.load_device} "
                             "(ComfyUI runs with --gpu-only/--highvram or on the CPU), so the weights stay there",
                             moved=False)
    if not entries:
        if res.device_bytes > 0:
            return OffloadReport(0, "none", f"nothing freed: {fmt_mib(res.device_bytes)} sit on {res.load_device} "
                                 "but ComfyUI's model manager does not track this model, so it was left untouched",
                                 moved=False)
        return OffloadReport(0, "none", f"nothing freed: not loaded on {res.load_device} "
                             f"(weights already on {res.offload_device})", moved=False)
    if res.device_bytes == 0:
        return OffloadReport(0, "none", f"nothing freed: already offloaded to {res.offload_device}", moved=False)

    device = entries[0][1].device
    if hasattr(mm, "unload_model_and_clones"):
        mm.unload_model_and_clones(p, unload_additional_models=False)
        method = "unload_model_and_clones"
    elif _free_memory_takes_keep_loaded(mm):
        keep = [lm for lm in mm.current_loaded_models if not _targets(p, lm)]
        mm.free_memory(1e30, device, keep_loaded=keep)
        method = "free_memory(keep_loaded=others)"
    else:
        for index, loaded in reversed(entries):
            if loaded.model_unload():
                mm.current_loaded_models.pop(index)
        mm.soft_empty_cache()
        method = "LoadedModel.model_unload"

    freed = max(0, res.device_bytes - int(p.loaded_size()))
    where = "ComfyUI keeps the host copy (Dynamic VRAM)" if res.dynamic else f"weights now on {res.offload_device}"
    if freed == 0:
        return OffloadReport(0, method, f"ComfyUI was asked to unload, but {fmt_mib(res.device_bytes)} are still "
                             f"on {res.load_device}", moved=False)
    return OffloadReport(freed, method, f"freed {fmt_mib(freed)} on {res.load_device}; {where}", moved=True)


def loaded_models_summary(mm: Any) -> list[LoadedModelInfo]:
    out = []
    for lm in list(mm.current_loaded_models):
        p = lm.model
        if p is None:
            continue
        out.append(LoadedModelInfo(type(p.model).__name__, str(lm.device), int(lm.model_loaded_memory()),
                                   int(lm.model_memory()), _is_dynamic(p)))
    return out


def memory_flags(mm: Any) -> dict[str, str]:
    """ComfyUI's memory mode, as far as this version exposes it."""
    flags: dict[str, str] = {}
    state = getattr(mm, "vram_state", None)
    if state is not None:
        flags["vram_state"] = getattr(state, "name", str(state))
    limit = getattr(mm, "MAX_PINNED_MEMORY", None)
    if limit is not None:
        flags["pinned_memory"] = "off" if limit <= 0 else f"on (limit {limit / GiB:.1f} GiB)"
    pinned = getattr(mm, "TOTAL_PINNED_MEMORY", None)
    if pinned is not None:
        flags["pinned_now"] = f"{pinned / GiB:.2f} GiB"
    smart = getattr(mm, "DISABLE_SMART_MEMORY", None)
    if smart is not None:
        flags["smart_memory"] = "off" if smart else "on"
    return flags
