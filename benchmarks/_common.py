"""What the benchmark scripts share: importing the repo as `slipstream`, measuring in a fresh process,
timing variants fairly, and printing the result table.

A measurement runs in a child process of its own so that its peak RSS (the kernel's ru_maxrss, the
resident high-water mark) belongs to that measurement alone: inside one process the peak of an earlier
run would hide a smaller later one. The child prints one JSON line last; the parent reads it back.

Timing is interleaved: every round visits every variant once (rounds outermost), so a slow spell of a
shared machine hits all variants alike, and each result is the minimum over rounds of a mean over a
block of calls (>= `min_block_s`). Ratios are taken between variants of the same run.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def import_package() -> None:
    """The repository as package `slipstream` (as ComfyUI and the tests import it), installed or not."""
    if "slipstream" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("slipstream", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["slipstream"] = module
    spec.loader.exec_module(module)


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(script: str, *args: str) -> dict:
    """Run `python script *args` in a fresh process and return the JSON object it printed last.

    A child that fails stops the benchmark with its stderr, so a broken measurement is never a row.
    """
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _block_mean(fn: Callable[[], object], min_block_s: float) -> float:
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_block_s:
            return elapsed / calls


def interleaved_times(variants: dict[Hashable, Callable[[], object]], rounds: int,
                      min_block_s: float = 0.02) -> dict[Hashable, tuple[float, float]]:
    """{name: (min ms, median ms)} over `rounds` interleaved rounds (one warm-up call each first)."""
    for fn in variants.values():
        fn()
    samples: dict[Hashable, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_block_mean(fn, min_block_s) * 1e3)
    return {name: (min(s), statistics.median(s)) for name, s in samples.items()}


def rel_error(y, ref) -> float:
    """||y - ref|| / ||ref|| of two tensors, computed in float64."""
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm())


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]], formats: Sequence[str]) -> None:
    """Rows under a header line and a rule, each value written with its column's format spec (e.g.
    ".2f"); text columns (spec "") are left-aligned, numbers right-aligned, columns as wide as their content."""
    cells = [[format(value, spec) for value, spec in zip(row, formats, strict=True)] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if spec == "" else v.rjust(w)
                         for v, w, spec in zip(values, widths, formats, strict=True))

    print(line(headers))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for row in cells:
        print(line(row))


def best_times(fns, repeats: int) -> list[float]:
    """Best (minimum) CPU seconds of each function, measured round-robin so every one sees the same load.

    Process CPU time, not wall time: on a shared machine wall time mostly measures preemption by
    other jobs. Run with --threads 1 so CPU time equals the work done (no idle-spinning threads).
    The minimum, because contention (cache, memory bandwidth) only ever adds time.
    """
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.process_time()
            fn()
            bucket.append(time.process_time() - start)
    return [min(bucket) for bucket in times]


def cpu_features() -> str:
    """The SIMD level torch dispatches to and the relevant flags of this CPU."""
    import torch

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return (f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; flags: "
            + (" ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)))
