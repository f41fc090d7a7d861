"""How much host RAM this process may still use, honest inside containers.

psutil reads /proc/meminfo, which inside a container describes the *host*; the limit that kills
us is the memory cgroup's. So the effective figure is the smaller of the two: host available RAM
and, for every cgroup level between ours and the mount root that sets a limit, limit minus usage
(usage without the reclaimable inactive page cache, as `docker stats` counts it).

Paths are parameters so cgroup v1 and v2 layouts are tested from temporary files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

# cgroup v1 reports "no limit" as a page-rounded LONG_MAX (9223372036854771712); anything this
# large is no limit on any real machine.
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory cgroup level above this process."""

    version: int          # 1 or 2
    path: str             # the cgroup directory the limit was read from
    limit: int            # bytes
    usage: int            # bytes charged, minus inactive page cache (reclaimable)

    @property
    def available(self) -> int:
        return max(0, self.limit - self.usage)


@dataclass(frozen=True)
class RamInfo:
    """Host RAM as the cache should see it: effective figures first, the raw sources after."""

    total: int                      # min(host total, cgroup limit)
    available: int                  # min(host available, cgroup limit - usage)
    host_total: int
    host_available: int
    cgroup: CgroupMemory | None     # None when no cgroup sets a memory limit

    @property
    def used(self) -> int:
        return max(0, self.total - self.available)


RamProbe = Callable[[], RamInfo]


def _read_int(path: Path) -> int | None:
    """An integer file of the cgroup fs; None for missing files and for 'max' (v2 "no limit")."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_stat(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == field:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_paths(proc_self_cgroup: Path) -> tuple[str | None, str | None]:
    """(v2 relative path, v1 memory-controller relative path) of this process."""
    v2 = v1 = None
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        if hierarchy == "0" and controllers == "":
            v2 = rel
        elif "memory" in controllers.split(","):
            v1 = rel
    return v2, v1


def _levels(mount: Path, rel: str | None) -> list[Path]:
    """The cgroup directories from ours up to the mount root; a path hidden by a namespace is skipped."""
    chain: list[Path] = []
    parts = [p for p in (rel or "").split("/") if p]
    for depth in range(len(parts), -1, -1):
        candidate = mount.joinpath(*parts[:depth])
        if candidate.is_dir():
            chain.append(candidate)
    return chain


# Per cgroup version: (limit file, usage file, memory.stat field of the reclaimable inactive page cache).
_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
          1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def _level(directory: Path, version: int) -> CgroupMemory | None:
    limit_file, usage_file, inactive_field = _FILES[version]
    limit = _read_int(directory / limit_file)
    usage = _read_int(directory / usage_file)
    if limit is None or usage is None or limit >= _UNLIMITED:
        return None
    usage -= _read_stat(directory / "memory.stat", inactive_field)
    return CgroupMemory(version, str(directory), limit, max(0, usage))


def read_cgroup_memory(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> CgroupMemory | None:
    """The cgroup level with the least room left, or None when no level limits memory.

    cgroup v2 (unified: `root/memory.max`, `memory.current`) is tried first, then v1
    (`root/memory/…/memory.limit_in_bytes`, `memory.usage_in_bytes`).
    """
    root = Path(root)
    rel_v2, rel_v1 = _cgroup_paths(Path(proc_self_cgroup))
    found: list[CgroupMemory] = []
    if (root / "cgroup.controllers").is_file():
        found += [lv for d in _levels(root, rel_v2) if (lv := _level(d, 2)) is not None]
    if not found:
        mount = root / "memory"
        found += [lv for d in _levels(mount, rel_v1) if (lv := _level(d, 1)) is not None]
    if not found:
        return None
    return min(found, key=lambda lv: lv.available)


def probe_ram(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP,
              virtual_memory: Callable[[], object] | None = None) -> RamInfo:
    """Host RAM figures clipped by the cgroup limit (see the module docstring)."""
    if virtual_memory is None:
        import psutil

        virtual_memory = psutil.virtual_memory
    vm = virtual_memory()
    host_total, host_available = int(vm.total), int(vm.available)
    cgroup = read_cgroup_memory(root, proc_self_cgroup)
    total, available = host_total, host_available
    if cgroup is not None:
        total = min(total, cgroup.limit)
        available = min(available, cgroup.available)
    return RamInfo(total, available, host_total, host_available, cgroup)
