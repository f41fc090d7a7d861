"""The DRAM cache core: keys, budget, LRU, weak aliases, errors, cgroup-aware RAM probing, stats."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
from slipstream.kernels import dram, dram_report, sysmem
from slipstream.kernels.dram import CacheKeyNotFoundError, DramCache, GiB, InsufficientDramError
from slipstream.kernels.sysmem import CgroupMemory, RamInfo


class Blob:
    """A stand-in for a model object: weak-referenceable, with a size."""

    def __init__(self, name: str, nbytes: int = 0):
        self.name = name
        self.nbytes = nbytes


def fixed_ram(available: int, total: int = 64 * GiB):
    info = RamInfo(total, available, total, available, None)
    return lambda: info


def physical_ram(cache_ref: list, physical_free: int, total: int = 64 * GiB):
    """RAM that frees up when the cache drops entries (weights referenced nowhere else)."""
    def probe() -> RamInfo:
        cache = cache_ref[0]
        avail = physical_free - (cache.held_bytes() if cache is not None else 0)
        return RamInfo(total, avail, total, avail, None)
    return probe


def small_cache(budget=100, headroom=0, available=1 << 40) -> DramCache:
    return DramCache(budget_bytes=budget, headroom_bytes=headroom, ram_probe=fixed_ram(available))


# ---------------------------------------------------------------- keys


def test_key_is_stable_and_readable(tmp_path):
    f = tmp_path / "umt5_tiny.safetensors"
    f.write_bytes(b"x" * 100)
    a = dram.dram_key("clip", [f], dtype="fp16", device="default")
    b = dram.dram_key("clip", str(f), device="default", dtype="fp16")   # option order does not matter
    assert a == b
    assert a.startswith("clip:umt5_tiny.safetensors@") and len(a.split("@")[1]) == 12


def test_key_changes_with_options_kind_and_files(tmp_path):
    f, g = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    f.write_bytes(b"x" * 10)
    g.write_bytes(b"y" * 10)
    base = dram.dram_key("clip", [f], dtype="fp16")
    assert dram.dram_key("clip", [f], dtype="bf16") != base
    assert dram.dram_key("model", [f], dtype="fp16") != base
    both = dram.dram_key("clip", [f, g], dtype="fp16")
    assert both != base and "a.safetensors+b.safetensors@" in both


def test_key_invalidated_when_file_changes(tmp_path):
    f = tmp_path / "te.safetensors"
    f.write_bytes(b"x" * 100)
    st = os.stat(f)
    first = dram.dram_key("clip", [f])
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))     # same size, newer mtime
    second = dram.dram_key("clip", [f])
    assert second != first
    f.write_bytes(b"x" * 101)                                          # new size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))       # even with the same mtime
    assert dram.dram_key("clip", [f]) not in (first, second)


def test_key_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Cannot build a DRAM cache key: model file not found"):
        dram.dram_key("clip", [tmp_path / "missing.safetensors"])
    with pytest.raises(ValueError, match="at least one"):
        dram.dram_key("clip", [])
    with pytest.raises(ValueError, match="kind"):
        dram.dram_key("a:b", [tmp_path])


# ---------------------------------------------------------------- budget and LRU


def test_budget_respected_and_lru_evicted():
    cache = small_cache(budget=100)
    a, b, c = Blob("a"), Blob("b"), Blob("c")
    assert cache.put("a", a, "clip", 40) == []
    assert cache.put("b", b, "clip", 40) == []
    evicted = cache.put("c", c, "clip", 40)
    assert [e.key for e in evicted] == ["a"]
    assert cache.keys() == ["b", "c"]
    assert cache.held_bytes() == 80 <= cache.budget_bytes


def test_lookup_refreshes_lru_order():
    cache = small_cache(budget=100)
    for name in "abc":
        cache.put(name, Blob(name), "clip", 30)
    assert cache.lookup("a").name == "a"          # a becomes most recently used
    assert cache.keys() == ["b", "c", "a"]
    evicted = cache.put("d", Blob("d"), "model", 30)
    assert [e.key for e in evicted] == ["b"]
    assert cache.entries()[-1].key == "d"
    assert cache.entries()[1].hits == 1           # 'a' was hit once


def test_re_put_same_key_does_not_double_count():
    cache = small_cache(budget=100)
    cache.put("a", Blob("a"), "clip", 60)
    cache.put("a", Blob("a2"), "clip", 60)        # replacing 'a' must not evict anything
    assert cache.keys() == ["a"] and cache.held_bytes() == 60
    assert cache.lookup("a").name == "a2"


def test_entry_larger_than_budget_raises_and_keeps_cache():
    cache = small_cache(budget=100)
    cache.put("a", Blob("a"), "clip", 50)
    with pytest.raises(InsufficientDramError) as err:
        cache.put("huge", Blob("huge"), "clip", 150)
    msg = str(err.value)
    assert msg.startswith("Insufficient DRAM available: need")
    assert "budget" in msg and "would not make room, so none was evicted" in msg
    assert cache.keys() == ["a"]


def test_ram_headroom_evicts_then_stores():
    ref: list = [None]
    cache = DramCache(budget_bytes=10 * GiB, headroom_bytes=1 * GiB, ram_probe=physical_ram(ref, 6 * GiB))
    ref[0] = cache
    cache.put("old", Blob("old"), "clip", 3 * GiB, new_ram_bytes=3 * GiB)     # 6 - 0 - 1 >= 3
    cache.put("mid", Blob("mid"), "clip", 1 * GiB, new_ram_bytes=1 * GiB)     # 6 - 3 - 1 >= 1
    # 6 - 4 = 2 available, headroom 1: 1 GiB fits without eviction, 2 GiB needs 'old' gone.
    evicted = cache.put("new", Blob("new"), "clip", 2 * GiB, new_ram_bytes=2 * GiB)
    assert [e.key for e in evicted] == ["old"]
    assert cache.keys() == ["mid", "new"]


def test_insufficient_dram_after_eviction_failed():
    # RAM that does not come back when entries are dropped (the objects are referenced elsewhere).
    cache = DramCache(budget_bytes=100 * GiB, headroom_bytes=2 * GiB, ram_probe=fixed_ram(5 * GiB))
    cache.put("a", Blob("a"), "clip", 1 * GiB)
    cache.put("b", Blob("b"), "clip", 1 * GiB)
    with pytest.raises(InsufficientDramError) as err:
        cache.put("big", Blob("big"), "clip", 4 * GiB, new_ram_bytes=4 * GiB)
    msg = str(err.value)
    assert "need 4.00 GiB, available 5.00 GiB" in msg
    assert "headroom 2.00 GiB" in msg
    assert "Evicted 2 older entries first; still not enough" in msg
    assert "big" not in cache


def test_insufficient_dram_without_pointless_eviction():
    cache = DramCache(budget_bytes=100 * GiB, headroom_bytes=2 * GiB, ram_probe=fixed_ram(3 * GiB))
    cache.put("a", Blob("a"), "clip", 1 * GiB)
    with pytest.raises(InsufficientDramError) as err:
        cache.put("big", Blob("big"), "clip", 8 * GiB, new_ram_bytes=8 * GiB)
    msg = str(err.value)
    assert "need 8.00 GiB, available 3.00 GiB of RAM (headroom 2.00 GiB, cache holds 1.00 GiB in 1 entries)" in msg
    assert cache.keys() == ["a"]          # dropping 'a' could never have made room: it stays


def test_make_room_and_zero_new_ram_needs_no_ram():
    cache = DramCache(budget_bytes=100, headroom_bytes=10 * GiB, ram_probe=fixed_ram(1 * GiB))
    # Weights already in RAM (new_ram_bytes=0) do not need headroom.
    cache.put("a", Blob("a"), "clip", 50, new_ram_bytes=0)
    assert [e.key for e in cache.make_room(80)] == ["a"]


def test_relieve_pressure_drops_lru_until_headroom():
    ref: list = [None]
    cache = DramCache(budget_bytes=100 * GiB, headroom_bytes=2 * GiB, ram_probe=physical_ram(ref, 5 * GiB))
    ref[0] = cache
    for name in "abc":
        cache.put(name, Blob(name), "clip", 2 * GiB)      # new_ram 0: weights were already in RAM
    # 5 - 6 = -1 GiB available: drop 'a' (1), 'b' (3 >= 2): stop.
    assert [e.key for e in cache.relieve_pressure()] == ["a", "b"]
    assert cache.keys() == ["c"]


# ---------------------------------------------------------------- lookups and errors


def test_cache_key_not_found_lists_held_keys():
    cache = small_cache()
    with pytest.raises(CacheKeyNotFoundError, match=r"Cache key not found: 'nope'.*holds 0 key\(s\): nothing"):
        cache.get("nope")
    cache.put("clip:a@1", Blob("a"), "clip", 1)
    cache.put("model:b@2", Blob("b"), "model", 1)
    with pytest.raises(CacheKeyNotFoundError) as err:
        cache.get("clip:zzz")
    assert "holds 2 key(s): clip:a@1, model:b@2" in str(err.value)
    with pytest.raises(CacheKeyNotFoundError, match="Cache key not found"):
        cache.remove("clip:zzz")
    assert cache.lookup("clip:zzz") is None


def test_remove_and_clear_by_kind():
    cache = small_cache(budget=1000)
    cache.put("c1", Blob("c1"), "clip", 10)
    cache.put("m1", Blob("m1"), "model", 20)
    cache.put("c2", Blob("c2"), "clip", 30)
    assert cache.remove("m1").nbytes == 20
    assert [e.key for e in cache.clear(kind="vae")] == []
    assert sorted(e.key for e in cache.clear(kind="clip")) == ["c1", "c2"]
    assert len(cache) == 0


def test_put_none_refused():
    with pytest.raises(ValueError):
        small_cache().put("k", None, "clip", 1)


# ---------------------------------------------------------------- weak references


def test_weak_alias_does_not_keep_module_alive():
    cache = small_cache()
    module = Blob("shared weights")
    probe = weakref.ref(module)
    cache.alias(module, "clip:x@1")
    assert cache.key_for(module) == "clip:x@1"
    del module
    gc.collect()
    assert probe() is None


def test_register_loaded_is_weak_and_maps_clones():
    cache = small_cache()
    base, module = Blob("base clip"), Blob("module")
    clone = SimpleNamespace(patcher=SimpleNamespace(model=module))     # a clone shares the module
    cache.register_loaded("clip:te@abc", base, module)
    assert cache.key_for(clone.patcher.model) == "clip:te@abc"
    assert cache.loaded_object("clip:te@abc") is base
    probe = weakref.ref(base)
    del base
    gc.collect()
    assert probe() is None and cache.loaded_object("clip:te@abc") is None


def test_resolve_gives_loader_keys_and_derives_other_keys_once():
    cache = small_cache()
    base, module, stranger = Blob("base"), Blob("module"), Blob("other weights")
    cache.register_loaded("clip:te@abc", base, module)
    derived = []

    def derive() -> str:
        derived.append(1)
        return "clip:weights:Blob@0123"

    assert cache.resolve(module, "clip", derive) == ("clip:te@abc", base)
    assert not derived                                             # a loader's key needs no fingerprint
    assert cache.resolve(stranger, "clip", derive) == ("clip:weights:Blob@0123", None)
    assert cache.resolve(stranger, "clip", derive) == ("clip:weights:Blob@0123", None)
    assert len(derived) == 1                                       # remembered for the module's life
    del base
    gc.collect()
    assert cache.resolve(module, "clip", derive) == ("clip:te@abc", None)
    with pytest.raises(ValueError, match="not a 'clip:' key"):
        cache.resolve(Blob("third"), "clip", lambda: "vae:weights:X@1")


def test_weak_entries_hold_nothing_and_vanish():
    cache = small_cache(budget=10)
    obj = Blob("anon")
    probe = weakref.ref(obj)
    cache.put("clip:weights:x@1", obj, "clip", 10_000, weak=True)     # over budget, but weak: holds 0 bytes
    assert cache.held_bytes() == 0 and "clip:weights:x@1" in cache
    assert cache.entries()[0].weak
    del obj
    gc.collect()
    assert probe() is None
    assert "clip:weights:x@1" not in cache and len(cache) == 0


def test_strong_entry_keeps_object_until_removed():
    cache = small_cache(budget=10)
    obj = Blob("held")
    probe = weakref.ref(obj)
    cache.put("k", obj, "clip", 5)
    del obj
    gc.collect()
    assert probe() is not None
    cache.clear()
    gc.collect()
    assert probe() is None


def test_concurrent_use_is_consistent():
    cache = small_cache(budget=50)
    errors = []

    def worker(n):
        try:
            for i in range(200):
                cache.put(f"{n}-{i % 7}", Blob("x"), "clip", 5)
                cache.lookup(f"{n}-{(i + 3) % 7}")
                cache.entries()
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.held_bytes() <= 50


# ---------------------------------------------------------------- defaults and environment


def test_default_budget_and_headroom_follow_ram():
    cache = DramCache(ram_probe=fixed_ram(10 * GiB, total=16 * GiB))
    assert cache.budget_bytes == 8 * GiB
    assert cache.headroom_bytes == int(1.6 * GiB)
    assert dram.default_headroom(128 * GiB) == 4 * GiB


def test_default_cache_reads_environment(monkeypatch):
    monkeypatch.setenv(dram.ENV_BUDGET_GB, "1.5")
    monkeypatch.setenv(dram.ENV_HEADROOM_GB, "0.25")
    previous = dram.set_default_cache(None)
    try:
        cache = dram.default_cache()
        assert cache is dram.default_cache()
        assert cache.budget_bytes == int(1.5 * GiB) and cache.headroom_bytes == GiB // 4
        monkeypatch.setenv(dram.ENV_BUDGET_GB, "lots")
        dram.set_default_cache(None)
        with pytest.raises(ValueError, match="SLIPSTREAM_DRAM_BUDGET_GB='lots' is not a number"):
            dram.default_cache()
    finally:
        dram.set_default_cache(previous)


# ---------------------------------------------------------------- cgroup and RAM probing


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_nested_levels(tmp_path):
    root = tmp_path / "cg"
    _write(root / "cgroup.controllers", "cpu memory pids\n")
    _write(root / "kubepods" / "memory.max", str(16 * GiB))
    _write(root / "kubepods" / "memory.current", str(4 * GiB))
    leaf = root / "kubepods" / "pod1"
    _write(leaf / "memory.max", str(8 * GiB))
    _write(leaf / "memory.current", str(5 * GiB))
    _write(leaf / "memory.stat", f"anon 1\nfile 9\ninactive_file {1 * GiB}\nactive_file 5\n")
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/kubepods/pod1\n")
    cg = sysmem.read_cgroup_memory(root, proc)
    assert cg == CgroupMemory(2, str(leaf), 8 * GiB, 4 * GiB)
    assert cg.available == 4 * GiB
    # A tighter parent wins.
    _write(root / "kubepods" / "memory.current", str(14 * GiB))
    assert sysmem.read_cgroup_memory(root, proc).available == 2 * GiB


def test_cgroup_v2_unlimited(tmp_path):
    root = tmp_path / "cg"
    _write(root / "cgroup.controllers", "memory\n")
    _write(root / "memory.max", "max\n")
    _write(root / "memory.current", "12345\n")
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/\n")
    assert sysmem.read_cgroup_memory(root, proc) is None


def test_cgroup_v1_hidden_path_and_unlimited(tmp_path):
    root = tmp_path / "cg"
    mount = root / "memory"
    _write(mount / "memory.limit_in_bytes", str(6 * GiB))
    _write(mount / "memory.usage_in_bytes", str(3 * GiB))
    _write(mount / "memory.stat", f"cache 0\ntotal_inactive_file {1 * GiB}\n")
    proc = tmp_path / "proc_cgroup"
    # The process's path is hidden by a namespace: the mount root is the container's cgroup.
    _write(proc, "12:pids:/\n4:memory:/docker/abc123\n0::/\n")
    cg = sysmem.read_cgroup_memory(root, proc)
    assert cg is not None and cg.version == 1
    assert cg.limit == 6 * GiB and cg.usage == 2 * GiB and cg.available == 4 * GiB
    _write(mount / "memory.limit_in_bytes", "9223372036854771712")
    assert sysmem.read_cgroup_memory(root, proc) is None


def test_cgroup_v1_combined_controllers_path(tmp_path):
    root = tmp_path / "cg"
    leaf = root / "memory" / "job" / "7"
    _write(leaf / "memory.limit_in_bytes", str(2 * GiB))
    _write(leaf / "memory.usage_in_bytes", str(1 * GiB))
    proc = tmp_path / "proc_cgroup"
    _write(proc, "5:cpuacct,memory:/job/7\n")
    assert sysmem.read_cgroup_memory(root, proc).path == str(leaf)


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert sysmem.read_cgroup_memory(tmp_path / "nothing", tmp_path / "nothing_either") is None


def test_probe_ram_clips_host_figures_by_cgroup(tmp_path):
    root = tmp_path / "cg"
    _write(root / "cgroup.controllers", "memory\n")
    _write(root / "memory.max", str(8 * GiB))
    _write(root / "memory.current", str(6 * GiB))
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/\n")
    vm = lambda: SimpleNamespace(total=64 * GiB, available=40 * GiB)   # noqa: E731
    info = sysmem.probe_ram(root, proc, vm)
    assert (info.total, info.available, info.host_total, info.host_available) == (8 * GiB, 2 * GiB, 64 * GiB, 40 * GiB)
    assert info.used == 6 * GiB
    # Without a cgroup limit the host figures stand.
    info = sysmem.probe_ram(tmp_path / "none", proc, vm)
    assert (info.total, info.available, info.cgroup) == (64 * GiB, 40 * GiB, None)


def test_probe_ram_real_machine_is_sane():
    info = sysmem.probe_ram()
    assert 0 < info.available <= info.total


# ---------------------------------------------------------------- memory_stats


def test_memory_stats_block_with_gpu_models_and_cache():
    cache = small_cache(budget=4 * GiB)
    cache.put("clip:te.safetensors@abc", Blob("te"), "clip", 1536 * dram.MiB, note="RAM (from cuda:0)")
    ram = RamInfo(32 * GiB, 20 * GiB, 64 * GiB, 30 * GiB, CgroupMemory(2, "/sys/fs/cgroup", 32 * GiB, 12 * GiB))
    text = dram_report.memory_stats(
        cache, vram=(18 * GiB, 24 * GiB), ram=ram, flags={"vram_state": "NORMAL_VRAM"},
        loaded_models=[dram_report.LoadedModelInfo("WanModel", "cuda:0", 2 * GiB, 6 * GiB, dynamic=True)],
        headline=["Offload: freed 1536.0 MiB"])
    lines = text.splitlines()
    assert lines[0] == lines[2] == lines[-1] == "=" * 50 and lines[1] == "MEMORY STATUS"
    assert lines[3] == "Offload: freed 1536.0 MiB"
    assert lines[4] == ("VRAM 6.00/24.00 GiB used, 18.00 free | RAM 12.0/32.0 GiB used, 20.0 available | "
                        "DRAM cache 1 entry, 1.50/4.00 GiB")
    assert "VRAM: 6.00 GiB / 24.00 GiB used (free 18.00 GiB" in text
    assert "cgroup v2 limit 32.00 GiB" in text
    assert "  [CLIP] clip:te.safetensors@abc  (1536 MiB, held, hits 0, cached 0s ago, RAM (from cuda:0))" in text
    assert "  [0] WanModel on cuda:0: 2048 MiB loaded, 4096 MiB offloaded [dynamic]" in text
    assert "Mode: vram_state=NORMAL_VRAM" in text


def test_memory_stats_cpu_only_and_untracked_models():
    text = dram_report.memory_stats(small_cache(), vram=None, loaded_models=None)
    assert "VRAM: no GPU in use (CPU only)" in text
    assert "DRAM cache: empty" in text
    assert "Loaded models: not tracked by this host" in text
    assert "VRAM " not in text.splitlines()[3]
    assert "Loaded models: none" in dram_report.memory_stats(None, vram=None, loaded_models=[])
