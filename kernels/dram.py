"""A keyed host-RAM ("DRAM") cache for model objects, with a byte budget and LRU eviction.

Why it exists: ComfyUI drops a loader's output when another workflow is queued, so a 10 GB text
encoder is read from disk again and again. A Python reference kept here survives that; ComfyUI's
own model management still decides what sits in VRAM (it holds only weak references).

Two kinds of key name an entry:
- File keys (`dram_key`): file identity (path, size, mtime_ns) + load options. Every Slipstream
  loader that returns a CLIP gets its object through `load_keyed` with such a key (Load CLIP
  (keyed), Load Dual CLIP (keyed), Load Anima Text Encoder), so the next load of the same files
  with the same options is served from RAM, and a replaced file is never served stale.
- Weights keys (kernels/dram_fingerprint.py): for a CLIP no loader of ours registered (core
  Load CLIP, a checkpoint loader), derived from its weights, so the same model gets the same
  dram_id in every run. No loader can look such a key up to skip a disk read, so these entries are
  held weakly only: holding them strongly would keep RAM busy for nothing.

How a loader and the Offload node share an entry (`load_keyed` does the first three lines):
  key = dram_key("clip", [path], type="sd3", device="default")   # file identity + options
  cache = default_cache()
  obj = cache.lookup(key)                 # None on a miss: load from disk, then
  cache.register_loaded(key, obj, module) # remember the base object weakly; clones map back via `module`
  ...
  key, base = cache.resolve(clip.patcher.model, "clip", weights_key_of_clip)  # the Offload node
  cache.put(key, obj, "clip", nbytes, new_ram_bytes=...)  # strong reference, budget + RAM checked

The report the memory nodes show is rendered by kernels/dram_report.py.

Thread-safety: one lock around every mutation (ComfyUI runs prompts on one worker thread, but
the server thread may ask for stats).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .sysmem import RamInfo, RamProbe, probe_ram

GiB = 1 << 30
MiB = 1 << 20
ENV_BUDGET_GB = "SLIPSTREAM_DRAM_BUDGET_GB"
ENV_HEADROOM_GB = "SLIPSTREAM_DRAM_HEADROOM_GB"


class CacheKeyNotFoundError(LookupError):
    """A lookup named a key the DRAM cache does not hold."""


class DramSettingError(ValueError):
    """A DRAM cache setting from the environment is not a usable number."""


class InsufficientDramError(RuntimeError):
    """Storing an entry would exceed the budget or eat into the RAM headroom, even after eviction."""


# ---------------------------------------------------------------- keys


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """(absolute path, size, mtime_ns): changes whenever the file is replaced or rewritten."""
    absolute = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(absolute)
    except FileNotFoundError:
        raise FileNotFoundError(f"Cannot build a DRAM cache key: model file not found: {absolute}") from None
    return absolute, int(st.st_size), int(st.st_mtime_ns)


def dram_key(kind: str, paths: str | os.PathLike | Sequence[str | os.PathLike], **options: Any) -> str:
    """The stable cache key of a model loaded from files: `kind:name[+name2]@hash`.

    The hash covers the kind, every file's (absolute path, size, mtime_ns) and the options
    (dtype, device, type, …), so the same files loaded the same way give the same key in every
    run, and a changed file or option gives a new one. `load_keyed` builds its key with it.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not kind or ":" in kind:
        raise ValueError(f"DRAM key kind must be a non-empty word without ':', got {kind!r}")
    if not paths:
        raise ValueError("dram_key needs at least one model file path")
    identities = [file_identity(p) for p in paths]
    payload = json.dumps({"kind": kind, "files": identities, "options": options}, sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]
    names = "+".join(os.path.basename(p) for p, _, _ in identities)
    return f"{kind}:{names}@{digest}"


# ---------------------------------------------------------------- entries


@dataclass
class _Entry:
    key: str
    kind: str
    nbytes: int
    created: float
    last_used: float
    hits: int
    note: str
    strong: Any = None
    weak: weakref.ref | None = None

    @property
    def obj(self) -> Any:
        return self.weak() if self.weak is not None else self.strong

    @property
    def held_bytes(self) -> int:
        """Bytes this entry keeps alive: a weak entry keeps nothing alive."""
        return 0 if self.weak is not None else self.nbytes


@dataclass(frozen=True)
class EntryInfo:
    """A read-only view of one entry, for reports and tests."""

    key: str
    kind: str
    nbytes: int
    weak: bool
    hits: int
    age_s: float
    idle_s: float
    note: str


def count_entries(n: int, adjective: str = "") -> str:
    """'1 entry', '3 entries' (with an optional adjective: '2 older entries')."""
    return f"{n} {adjective}entr{'y' if n == 1 else 'ies'}"


def gib_text(n: float) -> str:
    """2.00 GiB: how the cache and the report write byte counts."""
    return f"{n / GiB:.2f} GiB"


def _env_gib(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise DramSettingError(f"{name}={raw!r} is not a number of GiB (e.g. 16 or 7.5)") from None
    if not math.isfinite(value) or value < 0:
        raise DramSettingError(f"{name}={raw!r} must be a finite number of GiB, 0 or more (e.g. 16 or 7.5); "
                         "unset it to use the default.")
    return int(value * GiB)


def default_headroom(total_ram: int) -> int:
    """RAM to leave to the OS and other programs: 10 % of RAM, at most 4 GiB."""
    return min(4 * GiB, total_ram // 10)


class DramCache:
    """LRU cache of model objects with a byte budget and a free-RAM headroom.

    budget_bytes: most bytes the cache may keep alive (default: half of the effective RAM).
    headroom_bytes: RAM that must stay available after a store (default: `default_headroom`).
    ram_probe: returns RamInfo; injectable so tests can simulate any machine.
    """

    def __init__(self, budget_bytes: int | None = None, headroom_bytes: int | None = None,
                 ram_probe: RamProbe = probe_ram, clock=time.monotonic):
        self._probe = ram_probe
        self._clock = clock
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()          # oldest use first
        self._aliases: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._sources: dict[str, weakref.ref] = {}
        total = ram_probe().total if budget_bytes is None or headroom_bytes is None else 0
        self.budget_bytes = int(budget_bytes) if budget_bytes is not None else total // 2
        self.headroom_bytes = int(headroom_bytes) if headroom_bytes is not None else default_headroom(total)

    # ------------------------------------------------------------ lookups

    def __len__(self) -> int:
        with self._lock:
            self._prune()
            return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            self._prune()
            return key in self._entries

    def probe_ram(self) -> RamInfo:
        """RAM as this cache sees it (its injectable probe, so reports and tests agree with it)."""
        return self._probe()

    def keys(self) -> list[str]:
        """Keys in LRU order (least recently used first)."""
        with self._lock:
            self._prune()
            return list(self._entries)

    def lookup(self, key: str) -> Any | None:
        """The cached object (a hit refreshes its LRU position), or None on a miss."""
        with self._lock:
            self._prune()
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.hits += 1
            entry.last_used = self._clock()
            self._entries.move_to_end(key)
            return entry.obj

    def get(self, key: str) -> Any:
        """Like lookup(), but a missing key raises CacheKeyNotFoundError naming the keys held."""
        with self._lock:
            obj = self.lookup(key)
            if obj is None:
                raise self._not_found(key)
            return obj

    def _not_found(self, key: str) -> CacheKeyNotFoundError:
        held = list(self._entries)
        listing = ", ".join(held) if held else "nothing (the cache is empty)"
        return CacheKeyNotFoundError(
            f"Cache key not found: '{key}'. The DRAM cache holds {len(held)} key(s): {listing}. "
            "The entry may have been evicted (budget or low RAM) or cleared; the model will load from disk.")

    # ------------------------------------------------------------ aliases and loader registrations

    def alias(self, module: Any, key: str) -> None:
        """Map a shared weight module (e.g. clip.patcher.model) to a key, weakly: clones share it."""
        with self._lock:
            self._aliases[module] = key

    def key_for(self, module: Any) -> str | None:
        with self._lock:
            return self._aliases.get(module)

    def register_loaded(self, key: str, obj: Any, module: Any | None = None) -> None:
        """A loader announces the base object it built for `key` (weakly; nothing is kept alive).

        `module` is the nn.Module its clones share (clip.patcher.model, model.model); the Offload
        node resolves any clone back to `key` through it and caches this base object, not a clone
        that may carry LoRA patches.
        """
        with self._lock:
            self._sources[key] = weakref.ref(obj)
            if module is not None:
                self._aliases[module] = key

    def resolve(self, module: Any, kind: str, derive_key: Callable[[], str]) -> tuple[str, Any | None]:
        """(key, loader's base object or None) for the weight module a value and its clones share.

        A module no loader registered gets `derive_key()` (a weights key, see
        kernels/dram_fingerprint.py), computed once and remembered weakly, so every clone of it
        resolves to the same key for as long as the module lives without hashing it again.
        """
        with self._lock:
            key = self._aliases.get(module)
            if key is not None:
                return key, self.loaded_object(key)
        key = derive_key()           # outside the lock: it reads tensors (maybe on a GPU)
        if not key or not key.startswith(f"{kind}:"):
            raise ValueError(f"derive_key gave {key!r}, not a '{kind}:' key")
        with self._lock:
            self._aliases.setdefault(module, key)
            key = self._aliases[module]
            return key, self.loaded_object(key)

    def loaded_object(self, key: str) -> Any | None:
        """The base object a loader registered for `key`, if it is still alive."""
        with self._lock:
            ref = self._sources.get(key)
            obj = ref() if ref is not None else None
            if ref is not None and obj is None:
                del self._sources[key]
            return obj

    # ------------------------------------------------------------ storing

    def put(self, key: str, obj: Any, kind: str, nbytes: int, new_ram_bytes: int = 0,
            weak: bool = False, note: str = "") -> list[EntryInfo]:
        """Store `obj` under `key` and return the entries evicted to make room.

        nbytes: the object's weight bytes (counted against the budget unless weak).
        new_ram_bytes: bytes that will newly occupy host RAM because of this store (0 when the
        weights already live in RAM). Raises InsufficientDramError, storing nothing, when neither
        the budget nor the RAM headroom can be met even after evicting older entries.
        """
        if obj is None:
            raise ValueError("cannot cache None")
        with self._lock:
            self._prune()
            evicted = self._make_room(0 if weak else int(nbytes), int(new_ram_bytes), keep=key)
            now = self._clock()
            old = self._entries.pop(key, None)
            entry = _Entry(key, kind, int(nbytes), old.created if old else now, now, old.hits if old else 0, note)
            if weak:
                try:
                    entry.weak = weakref.ref(obj)
                except TypeError:
                    raise TypeError(f"{type(obj).__name__} cannot be cached weakly (no weak references)") from None
            else:
                entry.strong = obj
            self._entries[key] = entry
            return evicted

    def make_room(self, nbytes: int, new_ram_bytes: int = 0, keep: str | None = None) -> list[EntryInfo]:
        """Evict LRU entries until `nbytes` fit the budget and `new_ram_bytes` fit above the headroom."""
        with self._lock:
            self._prune()
            return self._make_room(int(nbytes), int(new_ram_bytes), keep)

    def _make_room(self, nbytes: int, new_ram: int, keep: str | None) -> list[EntryInfo]:
        def held() -> int:
            return sum(e.held_bytes for k, e in self._entries.items() if k != keep)

        def budget_short() -> bool:
            return held() + nbytes > self.budget_bytes

        def ram_short(ram: RamInfo) -> bool:
            return new_ram > 0 and new_ram > ram.available - self.headroom_bytes

        def still_short(credit: int) -> bool:
            """Short even if `credit` freed bytes came back to RAM (judged against the last probe)."""
            return budget_short() or (new_ram > 0 and new_ram > ram.available + credit - self.headroom_bytes)

        ram = self._probe()
        if not budget_short() and not ram_short(ram):
            return []
        evictable = [e for k, e in self._entries.items() if k != keep and e.held_bytes > 0]
        reclaimable = sum(e.held_bytes for e in evictable)
        # Evicting cannot help if even dropping every evictable entry leaves us short: keep them.
        if held() - reclaimable + nbytes > self.budget_bytes:
            raise self._insufficient(nbytes, new_ram, ram, "budget", tried=False)
        if new_ram > 0 and new_ram > ram.available + reclaimable - self.headroom_bytes:
            raise self._insufficient(nbytes, new_ram, ram, "ram", tried=False)
        evicted: list[EntryInfo] = []
        while evictable:
            evicted += self._evict_lru_run(evictable, still_short)
            if new_ram > 0:
                gc.collect()        # the freed weights only show in the RAM probe once collected
                ram = self._probe()
            if not budget_short() and not ram_short(ram):
                return evicted
        raise self._insufficient(nbytes, new_ram, ram, "budget" if budget_short() else "ram", tried=True,
                                 evicted=evicted)

    def _evict_lru_run(self, evictable: list[_Entry], still_short: Callable[[int], bool]) -> list[EntryInfo]:
        """Drop entries from the front of `evictable` (least recently used first) while
        still_short(bytes dropped so far) holds: the shortest run that would suffice if every dropped
        byte came back. The caller then measures once, since gc.collect() is slow in a big process."""
        dropped: list[EntryInfo] = []
        credit = 0
        while evictable and still_short(credit):
            entry = evictable.pop(0)
            dropped.append(self._info(entry))
            del self._entries[entry.key]
            entry.strong = None
            credit += entry.nbytes
        return dropped

    def _insufficient(self, nbytes: int, new_ram: int, ram: RamInfo, reason: str, tried: bool,
                      evicted: Sequence[EntryInfo] = ()) -> InsufficientDramError:
        held = sum(e.held_bytes for e in self._entries.values())
        n = sum(1 for e in self._entries.values() if e.held_bytes > 0)
        if reason == "budget":
            need, available = nbytes, max(0, self.budget_bytes - held)
            where = f"of the DRAM cache budget ({gib_text(self.budget_bytes)}, env {ENV_BUDGET_GB})"
        else:
            need, available = new_ram, ram.available
            where = "of RAM" + (" (cgroup-limited)" if ram.cgroup is not None else "")
        step = (f"Evicted {count_entries(len(evicted), 'older ')} first; still not enough."
                if tried else "Evicting every older entry would not make room, so none was evicted.")
        return InsufficientDramError(
            f"Insufficient DRAM available: need {gib_text(need)}, available {gib_text(available)} {where} "
            f"(headroom {gib_text(self.headroom_bytes)}, cache holds {gib_text(held)} in {n} entries). {step} "
            "The model was left where it was. Free RAM (close programs, run Memory Cleanup), raise "
            f"{ENV_BUDGET_GB} or lower {ENV_HEADROOM_GB}, or let ComfyUI manage this model without the cache.")

    # ------------------------------------------------------------ removing

    def remove(self, key: str) -> EntryInfo:
        """Drop one entry; a missing key raises CacheKeyNotFoundError."""
        with self._lock:
            self._prune()
            entry = self._entries.pop(key, None)
            if entry is None:
                raise self._not_found(key)
            return self._info(entry)

    def clear(self, kind: str | None = None) -> list[EntryInfo]:
        """Drop every entry (or every entry of one kind); returns what was dropped."""
        with self._lock:
            self._prune()
            gone = [e for e in self._entries.values() if kind is None or e.kind == kind]
            for entry in gone:
                del self._entries[entry.key]
            return [self._info(e) for e in gone]

    def relieve_pressure(self) -> list[EntryInfo]:
        """Drop LRU entries while available RAM is below the headroom (call at node start)."""
        with self._lock:
            self._prune()
            ram = self._probe()
            evictable = [e for e in self._entries.values() if e.held_bytes > 0]

            def still_short(credit: int) -> bool:
                return ram.available + credit < self.headroom_bytes

            evicted: list[EntryInfo] = []
            while evictable and still_short(0):
                evicted += self._evict_lru_run(evictable, still_short)
                gc.collect()
                ram = self._probe()
            return evicted

    # ------------------------------------------------------------ reporting

    def entries(self) -> list[EntryInfo]:
        """Entries in LRU order (least recently used first)."""
        with self._lock:
            self._prune()
            return [self._info(e) for e in self._entries.values()]

    def held_bytes(self) -> int:
        with self._lock:
            self._prune()
            return sum(e.held_bytes for e in self._entries.values())

    def _info(self, entry: _Entry) -> EntryInfo:
        now = self._clock()
        return EntryInfo(entry.key, entry.kind, entry.nbytes, entry.weak is not None, entry.hits,
                         max(0.0, now - entry.created), max(0.0, now - entry.last_used), entry.note)

    def _prune(self) -> None:
        """Forget weak entries whose object died (no callbacks: they could fire inside the lock)."""
        dead = [k for k, e in self._entries.items() if e.weak is not None and e.weak() is None]
        for key in dead:
            del self._entries[key]


# ---------------------------------------------------------------- the process-wide cache

_default_lock = threading.Lock()
_default: DramCache | None = None


def default_cache() -> DramCache:
    """The cache every node and loader of the pack shares (budget/headroom from the environment)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = DramCache(budget_bytes=_env_gib(ENV_BUDGET_GB), headroom_bytes=_env_gib(ENV_HEADROOM_GB))
        return _default


def set_default_cache(cache: DramCache | None) -> DramCache | None:
    """Swap the shared cache (tests; None recreates it from the environment on next use)."""
    global _default
    with _default_lock:
        previous, _default = _default, cache
        return previous


class KeyedLoad(NamedTuple):
    """What `load_keyed` gives a loader: the key, the object, and where the object came from."""

    key: str
    obj: Any
    source: str                 # "ram": the cache held it; "live": the loader's last object is alive; "disk": load()


def load_keyed(kind: str, paths: str | os.PathLike | Sequence[str | os.PathLike], load: Callable[[], Any],
               module_of: Callable[[Any], Any], cache: DramCache | None = None, **options: Any) -> KeyedLoad:
    """The object the cache or a live registration holds for these files and options, else `load()`.

    Every Slipstream loader that returns a CLIP calls this (Load CLIP (keyed), Load Dual CLIP
    (keyed), Load Anima Text Encoder), so the CLIP it returns carries the stable file-identity key
    (the Offload node then keeps it in RAM across workflow switches) and a second load of the same
    files with the same options is served from RAM instead of disk.
    `module_of(obj)` is the weight module its clones share (clip.patcher.model).
    """
    cache = cache or default_cache()
    key = dram_key(kind, paths, **options)
    held = cache.lookup(key)
    if held is not None:
        return KeyedLoad(key, held, "ram")
    held = cache.loaded_object(key)
    if held is not None:
        return KeyedLoad(key, held, "live")
    held = load()
    cache.register_loaded(key, held, module_of(held))
    return KeyedLoad(key, held, "disk")
