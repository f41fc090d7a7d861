"""Memory family: move a text encoder out of VRAM into a keyed RAM cache, and clear that cache.

The nodes are thin: the cache and its rules live in kernels/dram.py (keys of CLIPs no loader of
ours registered: kernels/dram_fingerprint.py; the report: kernels/dram_report.py), the unloading in
the host (host/comfy_memory.py inside ComfyUI). The keyed loaders are in nodes/memory_loaders.py. Neither node has IS_CHANGED: a volatile one would make
every node downstream of the passthrough re-run on every queue.
"""

from __future__ import annotations

import logging

from ..host import (
    clip_weights,
    loaded_models_summary,
    loader_source,
    memory_flags,
    model_residency,
    notice,
    offload_model_weights,
    soft_empty_cache,
    vram_info,
)
from ..kernels import dram, dram_report
from ..kernels.dram_fingerprint import weights_key

log = logging.getLogger("slipstream.memory")


class NotConnected:
    """What 'passthrough' carries when 'trigger' is not connected: wiring it onward still orders the graph
    (Memory Cleanup's trigger takes it), but a node that uses it as a value (a MODEL, a CLIP) gets a
    clear AttributeError instead of working on a stray True."""

    def __getattr__(self, name: str):
        raise AttributeError(f"'{name}': Offload CLIP's passthrough carries no value because its 'trigger' input "
                             "is not connected. Connect 'trigger' (e.g. the CONDITIONING), or wire the 'clip' "
                             "output where a CLIP is wanted.")

    def __repr__(self) -> str:
        return "<Offload CLIP passthrough: trigger not connected>"


class NotAClipError(TypeError):
    """Offload CLIP was given something that is not a CLIP."""


def _check_clip(clip) -> None:
    """A CLIP is what core CLIP loaders give: a patcher to unload and a tokenizer. Anything else (a VAE,
    a MODEL, a string from a direct API call) is refused before the cache or the host touch it."""
    if not (hasattr(clip, "patcher") and hasattr(clip, "tokenize")
            and getattr(getattr(clip, "patcher", None), "model", None) is not None):
        raise NotAClipError(f"Offload CLIP's 'clip' input must be a CLIP (from Load CLIP or a checkpoint loader), got "
                        f"{type(clip).__name__}. Wire the text encoder's CLIP output into 'clip'.")

def derived_key(clip) -> str:
    """The DRAM key of a CLIP no Slipstream loader registered, the same in every run: the file identity
    the host's loader recorded on its patcher where there is one (`clip:core:<file>@…`, see
    host.loader_source), else a fingerprint of its weights (`clip:weights:<class>@…`,
    kernels/dram_fingerprint.py)."""
    source = loader_source(clip)
    if source is not None:
        try:
            key = dram.dram_key("clip", source.paths, loader=source.factory, args=source.options)
            return "clip:core:" + key.split(":", 1)[1]
        except (OSError, ValueError):
            pass                      # a recorded file vanished since: the weights still say what it is
    module = clip.patcher.model
    return weights_key("clip", type(module).__name__, clip_weights(clip))


ANY = "*"
CATEGORY = "Slipstream/Memory"
_STALE_NOTE = " It is computed when the node runs; a cached node does not re-run, so it can be stale."


def _stats(cache: dram.DramCache, headline: list[str]) -> str:
    return dram_report.memory_stats(cache, vram=vram_info(), loaded_models=loaded_models_summary(),
                             flags=memory_flags(), headline=headline)


class OffloadClipToDram:
    """ArchAi3D_Offload_CLIP: unload a CLIP from VRAM via the host's model manager, keep it cached in RAM."""

    DESCRIPTION = ("Moves a text encoder's weights out of VRAM through ComfyUI's own model management and keeps "
                   "the CLIP cached in RAM under a stable key: file identity + options for CLIPs from Slipstream "
                   "loaders (Load CLIP (keyed), Load Dual CLIP (keyed)), which the next run then loads from RAM "
                   "instead of disk; a key derived from the weights for any other CLIP (held by weak reference). "
                   "Clones such as LoRA or clip-skip map to the same key. Wire the "
                   "conditioning into 'trigger' and take 'passthrough' onward so the offload happens right "
                   "after encoding, and the 'clip' output to encode again later. Says plainly when nothing was freed "
                   "(already on CPU, --gpu-only), and still frees VRAM when the RAM cache cannot take the CLIP.")
    CATEGORY = CATEGORY
    FUNCTION = "offload"
    RETURN_TYPES = ("STRING", "STRING", ANY, "CLIP")
    RETURN_NAMES = ("memory_stats", "dram_id", "passthrough", "clip")
    OUTPUT_TOOLTIPS = (
        "A readable memory report: what was freed, VRAM, RAM, the DRAM cache and loaded models." + _STALE_NOTE,
        "The DRAM cache key of this CLIP, the same in every run: file identity + options for CLIPs from "
        "Slipstream loaders (kept in RAM for the next run), a fingerprint of the weights for other CLIPs "
        "(held by weak reference only).",
        "The trigger input, unchanged: wire it onward to order the offload. With 'trigger' unconnected it "
        "carries no value (a node that tries to use it as one gets a clear error).",
        "The same CLIP, now offloaded: still usable (a text encode loads it back on demand), so later "
        "encodes can follow the offload.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder to move out of VRAM (a clone works too: the "
                                             "base model it shares weights with is unloaded)."}),
            },
            "optional": {
                "trigger": (ANY, {"tooltip": "Any value (usually the CONDITIONING from your text encode). The "
                                             "offload runs after it is produced and passes it through unchanged."}),
            },
        }

    def offload(self, clip, trigger=None) -> tuple:
        _check_clip(clip)
        cache = dram.default_cache()
        cache.relieve_pressure()
        module = clip.patcher.model          # shared by every clone of this CLIP
        key, base = cache.resolve(module, "clip", lambda: derived_key(clip))
        res = model_residency(clip)
        where = "RAM" if res.dynamic or res.same_device or res.device_bytes == 0 else f"RAM (from {res.load_device})"
        # Only a loader's base object is held strongly: a clone may carry LoRA patches, and no loader
        # ever looks a weights key up, so holding either strongly could only keep RAM busy for nothing.
        # Otherwise the entry weakly tracks the weight module every clone shares.
        refused = None
        try:
            evicted = cache.put(key, base if base is not None else module, "clip", res.total_bytes,
                                new_ram_bytes=res.new_ram_bytes, weak=base is None, note=where)
        except dram.InsufficientDramError as exc:
            # Freeing VRAM is the point of the node; the RAM cache is a bonus the budget can refuse.
            refused, evicted = exc, []
        try:
            report = offload_model_weights(clip)
        except Exception:
            if refused is None:
                cache.remove(key)
            raise
        headline = [report.line()]
        if refused is not None:
            headline.append(f"Not kept in the DRAM cache ({key} is not an entry): {refused}")
        if evicted:
            headline.append("Evicted to make room: " + ", ".join(e.key for e in evicted))
        if base is None and (":weights:" in key or ":core:" in key):
            origin = "this CLIP's weights" if ":weights:" in key else "the files ComfyUI's loader recorded"
            headline.append(f"Key {key} is derived from {origin} (it was not loaded by a Slipstream loader): the "
                            "same in every run, held by weak reference, so it does not keep the weights alive. "
                            "Load it with Load CLIP (keyed) to keep it in RAM for the next run.")
        elif base is None:
            headline.append(f"The loader's CLIP for {key} is gone; this clone is held by weak reference only.")
        if trigger is None:
            headline.append("Note: 'trigger' is not connected, so this offload is not ordered after the encode.")
        stats = _stats(cache, headline)
        log.info("[Slipstream] Offload CLIP %s: %s", key, report.message)
        if refused is not None:
            notice("Offload CLIP", f"VRAM freed, but the DRAM cache refused {key}: {refused}")
        return (stats, key, trigger if trigger is not None else NotConnected(), clip)


class MemoryCleanup:
    """SlipstreamMemoryCleanup: drop entries from the DRAM cache and report what that freed."""

    DESCRIPTION = ("Clears Slipstream's DRAM cache: every entry, one key (e.g. the dram_id of Offload CLIP), "
                   "or one kind (clip, model, vae, ...). Wire any value into 'trigger' to choose when it runs; "
                   "it passes that value through. It never unloads models ComfyUI manages for other nodes.")
    CATEGORY = CATEGORY
    FUNCTION = "cleanup"
    RETURN_TYPES = ("STRING", ANY)
    RETURN_NAMES = ("memory_stats", "passthrough")
    OUTPUT_TOOLTIPS = (
        "What was freed, followed by the memory report." + _STALE_NOTE,
        "The trigger input, unchanged (True when nothing is connected).",
    )
    MODES = ("all", "key", "kind")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clear": (list(cls.MODES), {"default": "all", "tooltip": "all: empty the cache; key: drop the "
                                            "entry named in 'target'; kind: drop every entry of the kind in "
                                            "'target'."}),
                "target": ("STRING", {"default": "", "tooltip": "For 'key': a dram_id (wire Offload CLIP's "
                                      "dram_id here). For 'kind': clip, model, vae, ... Ignored for 'all'."}),
                "empty_device_cache": ("BOOLEAN", {"default": True, "tooltip": "Also release the compute "
                                                   "device's cached-but-unused memory through the host."}),
            },
            "optional": {
                "trigger": (ANY, {"tooltip": "Any value: the cleanup runs after it is produced and passes it "
                                             "through, so you can place the cleanup in the graph."}),
            },
        }

    def cleanup(self, clear, target, empty_device_cache, trigger=None) -> tuple:
        cache = dram.default_cache()
        target = target.strip()
        if clear not in self.MODES:
            raise ValueError(f"clear must be one of {', '.join(self.MODES)}, got {clear!r}")
        if clear != "all" and not target:
            raise ValueError(f"clear='{clear}' needs a 'target' ({'a dram_id' if clear == 'key' else 'a kind'}).")
        if clear == "key":
            freed = [cache.remove(target)]
        else:
            freed = cache.clear(kind=target if clear == "kind" else None)
        if empty_device_cache:
            soft_empty_cache()
        held = sum(e.nbytes for e in freed if not e.weak)
        if freed:
            keys = ", ".join(e.key for e in freed)
            headline = [f"Cleanup: dropped {dram.count_entries(len(freed))} "
                        f"({held / dram.GiB:.2f} GiB no longer held by the cache): {keys}"]
        else:
            headline = ["Cleanup: the cache held nothing to drop" + (f" of kind '{target}'" if clear == "kind" else "")]
        log.info("[Slipstream] %s", headline[0])
        return (_stats(cache, headline), trigger if trigger is not None else True)
