"""Shared benchmark plumbing: import the repository as `slipstream`, time variants fairly.

Timing is interleaved: every round visits every variant once (rounds outermost), so a slow spell
of a shared machine hits all variants alike, and each table cell is the minimum over rounds of a
mean over a block of calls (≥ `min_block_s`). Ratios are taken between variants of the same run.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_package(name: str = "slipstream"):
    """The repository imported as a package (as ComfyUI imports it), whatever its folder is called."""
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _block_mean(fn: Callable[[], object], min_block_s: float) -> float:
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_block_s:
            return elapsed / calls


def interleaved_times(variants: dict[str, Callable[[], object]], rounds: int,
                      min_block_s: float = 0.02) -> dict[str, tuple[float, float]]:
    """{name: (min ms, median ms)} over `rounds` interleaved rounds (one warm-up call each first)."""
    for fn in variants.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_block_mean(fn, min_block_s) * 1e3)
    return {name: (min(s), statistics.median(s)) for name, s in samples.items()}


def rel_error(y, ref) -> float:
    """‖y − ref‖ / ‖ref‖ computed in float64."""
    y = y.double()
    ref = ref.double()
    return float((y - ref).norm() / ref.norm())


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
