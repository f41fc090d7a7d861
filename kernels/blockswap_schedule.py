"""The block-swap schedule and planner, as pure Python (no tensors, no devices).

`SwapSchedule` decides which swapped unit sits in which ring slot and when each unit is loaded;
it talks to the outside world only through three callbacks (`load`, `wait`, `done`). The runtime
swapper (kernels/blockswap.py) implements them with real copies and stream events, the timing
model below implements them with clocks — so the planner predicts exactly the schedule that runs.

Units are integers (positions in the model's list of swappable modules). A forward calls
`begin_forward()`, then `before(u)`/`after(u)` around every swapped unit it runs, then
`end_forward()`. The ring has `depth + 1` slots: while unit p computes, the next `depth` units of
the cyclic order are already loaded or in flight; finishing p frees its slot for unit p+depth+1.
The order wraps, so the first units of the next forward are prefetched during the tail of this one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class ScheduleOps(Protocol):
    def load(self, unit: int, slot: int) -> None:
        """Start moving `unit`'s weights into `slot` (after the slot's previous reader finished)."""

    def wait(self, unit: int, slot: int) -> None:
        """Make the compute that follows wait until `unit` has arrived in `slot`."""

    def done(self, unit: int, slot: int) -> None:
        """The compute that reads `slot` has been issued; the slot may be refilled after it."""


class SwapSchedule:
    """Slot bookkeeping for one ring of `depth + 1` device slots (see the module docstring)."""

    def __init__(self, order: Sequence[int], depth: int, ops: ScheduleOps):
        self.ops = ops
        self.order: list[int] = []
        self.position: dict[int, int] = {}
        self._set_order(order)
        k = len(self.order)
        self.depth = max(0, min(int(depth), k - 1)) if k else 0
        self.num_slots = self.depth + 1 if k else 0
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = list(range(self.num_slots))
        self.loads = 0
        self.misses = 0
        self.order_changes = 0
        self._cursor = -1            # position in `order` of the unit that ran last
        self._active: int | None = None
        self._seen: list[int] = []

    def _set_order(self, order: Sequence[int]) -> None:
        self.order = list(order)
        if len(set(self.order)) != len(self.order):
            raise ValueError(f"swap order lists a unit twice: {self.order}")
        self.position = {u: i for i, u in enumerate(self.order)}

    def is_swapped(self, unit: int) -> bool:
        return unit in self.position

    def _wanted_after(self, pos: int) -> list[int]:
        """The units that should occupy the ring once the unit at `pos` has run (cyclic)."""
        k = len(self.order)
        return [self.order[(pos + i) % k] for i in range(1, self.num_slots + 1)]

    def _load(self, unit: int, slot: int) -> None:
        self.slot_of[unit] = slot
        self.loads += 1
        self.ops.load(unit, slot)

    def _take_slot(self, keep: Sequence[int]) -> int:
        """A free slot, or the slot of the loaded unit needed last (never the one computing)."""
        if self.free:
            return self.free.pop(0)
        ranked = [u for u in self.slot_of if u != self._active]
        if not ranked:
            raise RuntimeError("block swap: no ring slot can be reused (a unit is running inside another)")
        keep_rank = {u: i for i, u in enumerate(keep)}
        victim = max(ranked, key=lambda u: keep_rank.get(u, len(keep) + 1))
        return self.slot_of.pop(victim)

    def _ensure(self, wanted: Sequence[int]) -> None:
        for unit in wanted:
            if unit not in self.slot_of:
                self._load(unit, self._take_slot(wanted))

    def begin_forward(self) -> None:
        self._seen = []
        self._cursor = -1
        if self.order:
            self._ensure(self._wanted_after(-1))

    def before(self, unit: int) -> int:
        """Make sure `unit` is (being) loaded and ordered before its compute; returns its slot."""
        if unit not in self.slot_of:
            self.misses += 1
            pos = self.position[unit]
            self._load(unit, self._take_slot(self._wanted_after(pos - 1)))
        slot = self.slot_of[unit]
        self.ops.wait(unit, slot)
        self._active = unit
        self._seen.append(unit)
        return slot

    def after(self, unit: int) -> None:
        slot = self.slot_of[unit]
        self.ops.done(unit, slot)
        self._active = None
        pos = self.position[unit]
        self._cursor = pos
        wanted = self._wanted_after(pos)
        if unit not in wanted:
            del self.slot_of[unit]
            self.free.append(slot)
        self._ensure(wanted)

    def end_forward(self) -> bool:
        """Adopt the execution order seen in this forward if it was complete and differs. Returns True if so."""
        seen, self._seen = self._seen, []
        if len(seen) == len(self.order) and set(seen) == set(self.order) and seen != self.order:
            self._set_order(seen)
            self.order_changes += 1
            return True
        return False


# ---------------------------------------------------------------- timing model


class _Clocks:
    """ScheduleOps on clocks: one serial copy engine, one serial compute stream, slots reused after compute."""

    def __init__(self, copy_s: Sequence[float]):
        self.copy_s = copy_s
        self.compute_t = 0.0
        self.copy_t = 0.0
        self.slot_free: dict[int, float] = {}
        self.ready: dict[int, float] = {}

    def load(self, unit: int, slot: int) -> None:
        start = max(self.copy_t, self.slot_free.get(slot, 0.0))
        self.copy_t = self.ready[unit] = start + self.copy_s[unit]

    def wait(self, unit: int, slot: int) -> None:
        self.compute_t = max(self.compute_t, self.ready[unit])

    def done(self, unit: int, slot: int) -> None:
        self.slot_free[slot] = self.compute_t


def simulate_swap(compute_s: Sequence[float], copy_s: Sequence[float], swapped: Sequence[int], depth: int,
                  forwards: int = 3) -> float:
    """Seconds to run `forwards` passes over all units with `swapped` streamed through the ring."""
    clocks = _Clocks(copy_s)
    schedule = SwapSchedule(sorted(swapped), depth, clocks)
    for _ in range(forwards):
        schedule.begin_forward()
        for unit, seconds in enumerate(compute_s):
            if schedule.is_swapped(unit):
                schedule.before(unit)
                clocks.compute_t += seconds
                schedule.after(unit)
            else:
                clocks.compute_t += seconds
        schedule.end_forward()
    return clocks.compute_t


# ---------------------------------------------------------------- placement and planning

PLACEMENTS = ("interleaved", "tail")


def swap_indices(num_blocks: int, count: int, placement: str = "interleaved") -> tuple[int, ...]:
    """Which of `num_blocks` blocks to swap: spread evenly (each transfer hides behind the resident
    blocks in between) or the last `count` (what other packs do; only as fast when copies are cheap)."""
    count = max(0, min(int(count), num_blocks))
    if placement == "tail":
        return tuple(range(num_blocks - count, num_blocks))
    if placement != "interleaved":
        raise ValueError(f"placement must be one of {PLACEMENTS}, got '{placement}'")
    return tuple(int((i + 0.5) * num_blocks / count) for i in range(count))


class SwapPlanError(ValueError):
    """A block-swap plan that cannot fit the device, with what to change."""


@dataclass(frozen=True)
class SwapPlan:
    """How many blocks to stream and what that costs. Byte counts are for the blocks only."""

    num_blocks: int
    swapped: tuple[int, ...]
    prefetch: int
    placement: str
    block_bytes: int             # largest block (= one ring slot)
    ring_bytes: int              # device memory of the ring
    host_bytes: int              # host memory holding the swapped blocks
    resident_bytes: int          # device memory of the blocks that stay
    max_free_swaps: int | None   # most blocks that can stream with no slowdown (needs bandwidth and compute)
    predicted_overhead: float | None  # fraction of a forward, from the timing model
    note: str = ""

    @property
    def count(self) -> int:
        return len(self.swapped)

    def describe(self) -> str:
        gib = 1024 ** 3
        if not self.swapped:
            text = f"block swap off: all {self.num_blocks} blocks resident ({self.resident_bytes / gib:.2f} GiB)"
        else:
            text = (f"block swap {self.count}/{self.num_blocks} blocks ({self.placement}, prefetch {self.prefetch}): "
                    f"{self.host_bytes / gib:.2f} GiB in host RAM, ring {self.ring_bytes / gib:.2f} GiB + "
                    f"{self.resident_bytes / gib:.2f} GiB resident on the device")
        if self.max_free_swaps is not None:
            text += f"; up to {self.max_free_swaps} can stream at no cost"
        if self.predicted_overhead is not None:
            text += f"; predicted overhead {100 * self.predicted_overhead:.1f}%"
        if self.note:
            text += f". {self.note}"
        return text


def max_free_swaps(num_blocks: int, block_bytes: int, bandwidth: float, block_seconds: float) -> int:
    """floor(N·C·B/S) capped at N: how many blocks the copy engine can move while all blocks compute."""
    if block_bytes <= 0:
        return num_blocks
    return max(0, min(num_blocks, math.floor(num_blocks * block_seconds * bandwidth / block_bytes)))


def _fits(resident: int, ring: int, reserve: int, free_vram: int) -> bool:
    return resident + ring + reserve <= free_vram


def plan_block_swap(block_bytes: Sequence[int], *, blocks_to_swap: int | None = None, prefetch: int = 1,
                    placement: str = "interleaved", free_vram: int | None = None, total_vram: int | None = None,
                    reserve_bytes: int = 0, bandwidth: float | None = None,
                    block_seconds: float | None = None) -> SwapPlan:
    """Choose (or check) how many blocks to stream.

    blocks_to_swap None means "auto": the fewest blocks that make the resident blocks, the ring and
    `reserve_bytes` (non-block weights + activations) fit in `free_vram`. An explicit count is kept;
    it fails only when it cannot fit the whole device (`total_vram`), since free memory may still
    grow when other models are unloaded. `bandwidth` (bytes/s) and `block_seconds` (compute of one
    block per forward), when known, add the no-cost limit and a predicted overhead.
    """
    sizes = [int(b) for b in block_bytes]
    n = len(sizes)
    slot = max(sizes, default=0)
    depth = max(0, int(prefetch))

    def memory(k: int) -> tuple[tuple[int, ...], int, int, int]:
        swapped = swap_indices(n, k, placement)
        d = min(depth, max(k - 1, 0))
        on_host = sum(sizes[i] for i in swapped)
        return swapped, d, on_host, ((d + 1) * slot if k else 0)

    def fits(k: int, budget: int) -> bool:
        _, _, on_host, ring = memory(k)
        return _fits(sum(sizes) - on_host, ring, reserve_bytes, budget)

    def smallest_fit(budget: int) -> int | None:
        return next((k for k in range(n + 1) if fits(k, budget)), None)

    def build(k: int, note: str = "") -> SwapPlan:
        swapped, d, on_host, ring = memory(k)
        resident = sum(sizes) - on_host
        free_k = overhead = None
        if bandwidth and block_seconds is not None and bandwidth > 0:
            free_k = max_free_swaps(n, slot, bandwidth, block_seconds)
            compute = [block_seconds] * n
            copy = [s / bandwidth for s in sizes]
            base = simulate_swap(compute, copy, (), 0)
            overhead = simulate_swap(compute, copy, swapped, d) / base - 1.0 if base > 0 else 0.0
        return SwapPlan(n, swapped, d, placement, slot, ring, on_host, resident, free_k, overhead, note)

    if blocks_to_swap is not None:
        plan = build(int(blocks_to_swap))
        if total_vram is not None and not fits(plan.count, total_vram):
            need = smallest_fit(total_vram)
            hint = (f"swap at least {need} blocks" if need is not None else
                    "even swapping every block does not fit: lower the resolution or frame count, or quantize "
                    "(fp8/int8)")
            raise SwapPlanError(
                f"Swapping {plan.count} of {n} blocks keeps {_gib(plan.resident_bytes + plan.ring_bytes)} of "
                f"weights on a device with {_gib(total_vram)} in total (plus ~{_gib(reserve_bytes)} for the rest). "
                f"{hint[0].upper() + hint[1:]}.")
        if free_vram is not None and not fits(plan.count, free_vram):
            return build(plan.count, f"needs more than the {_gib(free_vram)} free now; "
                                     "other models will have to be unloaded or it may run out of memory")
        return plan
    if free_vram is None:
        return build(0, "no device memory figure (CPU run): nothing to swap")
    need = smallest_fit(free_vram)
    if need is None:
        raise SwapPlanError(
            f"The model does not fit: even with all {n} blocks in host RAM, the ring "
            f"({_gib((min(depth, max(n - 1, 0)) + 1) * slot)}) and the rest (~{_gib(reserve_bytes)}) exceed the "
            f"{_gib(free_vram)} free. Lower the resolution or frame count, quantize (fp8/int8), or free VRAM.")
    return build(need)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 1024 ** 3:.2f} GiB"
