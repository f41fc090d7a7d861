"""Block swapping: run a model whose blocks do not all fit on the device, at (nearly) full speed.

The model is seen as a list of units (transformer blocks, optionally the text/image embedders).
The swapped units' weights live in host RAM, one flat buffer per unit (pinned when possible), and
those host copies are the masters: nothing is ever copied back. A `SwapSession` streams each
swapped unit into a ring of `prefetch + 1` device slots on a side stream just before it runs
(hooks on the units; the model's own forward loop is untouched), prefetching ahead and wrapping
around to the next forward. Which units to swap and how many: kernels/blockswap_schedule.py
(interleaved placement, planner, timing model). How bytes move: kernels/blockswap_transport.py.

    host = HostBlocks(units, swapped=plan.swapped, pin=True)   # once, at load
    host.move_rest(model, device)                               # resident weights to the device
    with SwapSession(host, units, transport, prefetch=1, root=model):
        model(...)                                              # any number of forwards

Weights are re-pointed with `.data` assignment, so Parameter objects keep their identity (`meta`
placeholders, used by the test transport, stand in for them only while parked); do not call `.to()` on the whole model
while blocks are swapped — use `move_rest`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .blockswap_schedule import (  # noqa: F401  (public API of the block swap)
    PLACEMENTS,
    SwapPlan,
    SwapPlanError,
    SwapSchedule,
    max_free_swaps,
    plan_block_swap,
    simulate_swap,
    swap_indices,
)
from .blockswap_transport import (  # noqa: F401
    CudaTransport,
    RecordingTransport,
    SwapOrderError,
    Transport,
    default_transport,
)

log = logging.getLogger("slipstream.blockswap")

ALIGN = 256  # byte alignment of every tensor inside a flat buffer (vectorised kernels, any dtype)


@dataclass(frozen=True)
class _Entry:
    """One tensor of a unit: where it hangs in the module tree and where it sits in the flat buffer."""

    module: nn.Module
    name: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size
    param: nn.Parameter | None  # the Parameter object, kept so it regains its place after a meta park


def _unit_tensors(unit: nn.Module) -> Iterator[tuple[nn.Module, str, bool, torch.Tensor]]:
    seen: set[int] = set()
    for module in unit.modules():
        for is_param, table in ((True, module._parameters), (False, module._buffers)):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) in seen:
                    raise ValueError(f"block swap: tensor '{name}' is shared inside one block; cannot flatten it")
                seen.add(id(tensor))
                yield module, name, is_param, tensor


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _layout(unit: nn.Module) -> tuple[list[_Entry], int, list[torch.Tensor]]:
    entries, tensors, offset = [], [], 0
    for module, name, is_param, tensor in _unit_tensors(unit):
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(_Entry(module, name, is_param, offset, nbytes, tensor.dtype, tensor.shape,
                              tensor if is_param else None))
        tensors.append(tensor)
        offset += _aligned(nbytes)
    return entries, offset, tensors


def unit_bytes(unit: nn.Module) -> int:
    """Bytes a unit occupies as one flat, aligned buffer (works on `meta` modules: no memory touched)."""
    return _layout(unit)[1]


def _views(flat: torch.Tensor, entries: Sequence[_Entry]) -> list[torch.Tensor]:
    return [flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in entries]


def _assign(entry: _Entry, tensor: torch.Tensor) -> None:
    """Point one weight at `tensor`. `.data` keeps the Parameter object (compile guards, user references);
    a `meta` placeholder cannot go through `.data`, so it temporarily takes the Parameter's place."""
    if not entry.is_param:
        entry.module._buffers[entry.name] = tensor
    elif tensor.device.type == "meta":
        entry.module._parameters[entry.name] = nn.Parameter(tensor, requires_grad=False)
    else:
        entry.param.data = tensor
        entry.module._parameters[entry.name] = entry.param


def _register_pinned(buf: torch.Tensor) -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 1) == 0
    except Exception:  # a torch without cudart bindings, or a driver refusing the range
        return False


def _unregister_pinned(ptrs: list[int]) -> None:
    for ptr in ptrs:
        try:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:
            pass


class HostBlocks:
    """The host copies (masters) of the swapped units: one flat buffer each, page-locked when possible.

    Building re-points each unit's tensors at views of its buffer, unit by unit, so the originals
    are freed as it goes (transient overhead: about one unit). `pin_budget` caps page-locked bytes;
    units past it, or past a refused registration, stay pageable (correct, but copies then block).
    """

    def __init__(self, units: Sequence[nn.Module], swapped: Sequence[int], pin: bool = True,
                 pin_budget: int | None = None):
        self.swapped: tuple[int, ...] = tuple(sorted(set(int(i) for i in swapped)))
        if any(i < 0 or i >= len(units) for i in self.swapped):
            raise ValueError(f"swapped units {self.swapped} out of range for {len(units)} units")
        self.layouts: dict[int, list[_Entry]] = {}
        self.buffers: dict[int, torch.Tensor] = {}
        self.host_views: dict[int, list[torch.Tensor]] = {}
        self.pinned_bytes = 0
        pinned_ptrs: list[int] = []
        refused = False
        for i in self.swapped:
            entries, nbytes, tensors = _layout(units[i])
            flat = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            views = _views(flat, entries)
            for entry, view, tensor in zip(entries, views, tensors, strict=True):
                if tensor.device.type == "meta":
                    raise ValueError(f"block swap: unit {i} has no weights yet ('{entry.name}' is on meta); "
                                     "load the checkpoint before planning the swap")
                view.copy_(tensor.detach())
                _assign(entry, view)
                if entry.is_param:
                    entry.module._parameters[entry.name].requires_grad_(False)
            del tensors
            if pin and not refused and (pin_budget is None or self.pinned_bytes + flat.numel() <= pin_budget):
                if _register_pinned(flat):
                    pinned_ptrs.append(flat.data_ptr())
                    self.pinned_bytes += flat.numel()
                elif torch.cuda.is_available():
                    refused = True
                    log.warning("block swap: page-locking host memory was refused after %.2f GiB; the rest stays "
                                "pageable (transfers will not overlap compute)", self.pinned_bytes / 1024 ** 3)
            self.layouts[i], self.buffers[i], self.host_views[i] = entries, flat, views
        self._finalizer = weakref.finalize(self, _unregister_pinned, pinned_ptrs)

    @property
    def slot_bytes(self) -> int:
        return max((b.numel() for b in self.buffers.values()), default=0)

    @property
    def host_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers.values())

    def owned_tensor_ids(self) -> set[int]:
        """ids of the Parameter/buffer objects the swap manages (for moving everything else)."""
        ids = set()
        for entries in self.layouts.values():
            for e in entries:
                table = e.module._parameters if e.is_param else e.module._buffers
                ids.add(id(table[e.name]))
        return ids

    def bind(self, unit: int, views: Sequence[torch.Tensor]) -> None:
        for entry, view in zip(self.layouts[unit], views, strict=True):
            _assign(entry, view)

    def park(self, unit: int, on_meta: bool = False) -> None:
        """Point a unit back at its host copy (or at `meta` placeholders, to catch unscheduled use)."""
        if on_meta:
            self.bind(unit, [torch.empty(e.shape, dtype=e.dtype, device="meta") for e in self.layouts[unit]])
        else:
            self.bind(unit, self.host_views[unit])

    def move_rest(self, root: nn.Module, device: torch.device | str) -> None:
        """Move every weight of `root` except the swapped ones to `device` (instead of root.to(device))."""
        device = torch.device(device)
        owned = self.owned_tensor_ids()
        for module in root.modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) not in owned and param.device != device:
                    moved = param.data.to(device)
                    if torch._has_compatible_shallow_copy_type(param, moved):
                        param.data = moved
                    else:  # e.g. to/from meta: what Module.to does, a new Parameter
                        module._parameters[name] = nn.Parameter(moved, requires_grad=param.requires_grad)
            for name, buf in module._buffers.items():
                if buf is not None and id(buf) not in owned and buf.device != device:
                    module._buffers[name] = buf.to(device)

    def release(self) -> None:
        """Unregister the page-locked ranges now (the buffers stay valid as pageable memory)."""
        self._finalizer()


class SwapSession:
    """One stretch of forwards with the swapped units streamed through a device ring (a context manager).

    `root` (the model) lets the session see where a forward starts and ends: it then prefetches the
    first units at the start and learns the real execution order from the first forward. Without
    it, units are expected in list order and prefetched once at entry. `on_unit` is called before
    every swapped or resident unit runs (the pipeline's interrupt check).
    """

    def __init__(self, host: HostBlocks, units: Sequence[nn.Module], transport: Transport, prefetch: int = 1,
                 root: nn.Module | None = None, order: Sequence[int] | None = None,
                 on_unit: Callable[[int], None] | None = None):
        self.host = host
        self.units = list(units)
        self.transport = transport
        self.prefetch = prefetch
        self.root = root
        self.order = list(order) if order is not None else list(host.swapped)
        if sorted(self.order) != list(host.swapped):
            raise ValueError("swap order must list exactly the swapped units")
        self.on_unit = on_unit
        self.schedule: SwapSchedule | None = None
        self._slots: list[torch.Tensor] = []
        self._slot_views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._handles: list = []
        self._bound: set[int] = set()
        self.bytes_moved = 0

    # ScheduleOps -----------------------------------------------------------
    def load(self, unit: int, slot: int) -> None:
        src = self.host.buffers[unit]
        self.bytes_moved += src.numel()
        self.transport.copy_in(unit, slot, self._slots[slot][:src.numel()], src)

    def wait(self, unit: int, slot: int) -> None:
        self.transport.wait_ready(unit, slot)

    def done(self, unit: int, slot: int) -> None:
        self.transport.mark_done(unit, slot)

    # hooks -----------------------------------------------------------------
    def _views_in(self, unit: int, slot: int) -> list[torch.Tensor]:
        key = (unit, slot)
        if key not in self._slot_views:
            self._slot_views[key] = _views(self._slots[slot], self.host.layouts[unit])
        return self._slot_views[key]

    def _make_pre(self, unit: int, swapped: bool):
        def pre(module, args):
            if self.on_unit is not None:
                self.on_unit(unit)
            if swapped:
                slot = self.schedule.before(unit)
                self.host.bind(unit, self._views_in(unit, slot))
                self._bound.add(unit)
        return torch.compiler.disable(pre)

    def _make_post(self, unit: int):
        def post(module, args, output):
            if unit not in self._bound:
                return None  # the pre-hook failed (e.g. an interrupt) before the unit was bound
            self._bound.discard(unit)
            self.host.park(unit, self.transport.parks_on_meta)
            self.schedule.after(unit)
            return None
        return torch.compiler.disable(post)

    def __enter__(self) -> SwapSession:
        self.schedule = SwapSchedule(self.order, self.prefetch, self)
        self._slots = [self.transport.slot_buffer(max(self.host.slot_bytes, 1))
                       for _ in range(self.schedule.num_slots)]
        try:
            for unit in self.host.swapped:
                self.host.park(unit, self.transport.parks_on_meta)
            for unit, module in enumerate(self.units):
                swapped = unit in self.host.layouts
                if swapped or self.on_unit is not None:
                    self._handles.append(module.register_forward_pre_hook(self._make_pre(unit, swapped)))
                if swapped:
                    self._handles.append(module.register_forward_hook(self._make_post(unit), always_call=True))
            if self.root is not None:
                self._handles.append(self.root.register_forward_pre_hook(
                    torch.compiler.disable(lambda module, args: self.schedule.begin_forward())))
                self._handles.append(self.root.register_forward_hook(
                    torch.compiler.disable(lambda module, args, out: self._end_forward()), always_call=True))
            else:
                self.schedule.begin_forward()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _end_forward(self) -> None:
        if self.schedule.end_forward():
            log.info("block swap: execution order differs from the block list; prefetching in the order seen")

    def __exit__(self, exc_type, exc, tb) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        try:
            self.transport.drain()
        finally:
            for unit in self.host.swapped:
                self.host.park(unit, on_meta=False)
            self._bound.clear()
            self._slot_views.clear()
            self._slots.clear()
            self.transport.close()

    def stats(self) -> dict[str, int]:
        s = self.schedule
        return {"loads": s.loads if s else 0, "misses": s.misses if s else 0,
                "order_changes": s.order_changes if s else 0, "bytes_moved": self.bytes_moved,
                "ring_slots": s.num_slots if s else 0}


def measure_h2d_bandwidth(device: torch.device | str, nbytes: int = 256 << 20) -> float | None:
    """Bytes/s of a pinned host→device copy (for the planner); None where there is no CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000.0
    return nbytes / seconds if seconds > 0 else None
