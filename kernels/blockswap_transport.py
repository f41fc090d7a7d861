"""How block weights travel from host RAM to the device ring: CUDA, plain CPU, and an observable fake.

A transport owns the device side of a swap session: it allocates ring slots, copies a unit's
flat host buffer into a slot, and orders compute after arrival and refills after compute. The
schedule never touches streams or events directly, so the same schedule runs on a GPU and,
in tests, against `RecordingTransport`, which logs every operation, delivers a copy only when
the compute side waits for it (a skipped wait reads poison), parks idle weights on `meta` (a
block computed before it arrived raises), and refuses to refill a slot that is still being read.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("slipstream.blockswap")


class SwapOrderError(RuntimeError):
    """The swap schedule broke a rule that, on a GPU, would read or overwrite weights mid-flight."""


class Transport:
    """The interface (and the plain-CPU implementation: synchronous copies into CPU slots)."""

    #: where ring slots live and swapped units compute
    device: torch.device = torch.device("cpu")
    #: park idle swapped weights on `meta` instead of their host views (tests: computing them raises)
    parks_on_meta: bool = False

    def __init__(self, copy: bool = True):
        self.copy = copy  # False elides the data movement (benchmarks of the bookkeeping alone)

    def slot_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy_in(self, unit: int, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.copy:
            dst.copy_(src)

    def wait_ready(self, unit: int, slot: int) -> None:
        pass

    def mark_done(self, unit: int, slot: int) -> None:
        pass

    def drain(self) -> None:
        """Finish every copy in flight (before slots are freed or weights re-pointed)."""

    def close(self) -> None:
        self.drain()


class CudaTransport(Transport):
    """H2D copies on a dedicated copy stream; events order compute after arrival and refills after compute.

    No host synchronisation in the steady state: the compute stream waits on `ready[slot]`, the
    copy stream waits on `done[slot]`. Copies are asynchronous only from pinned host memory; from
    pageable memory CUDA stages them and they block the issuing thread (still correct).
    """

    def __init__(self, device: torch.device | str, non_blocking: bool = True):
        super().__init__(copy=True)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CudaTransport needs a CUDA device, got {self.device}")
        self.non_blocking = non_blocking
        self.stream = torch.cuda.Stream(self.device)
        self.ready: dict[int, torch.cuda.Event] = {}
        self.done: dict[int, torch.cuda.Event] = {}
        self._done_recorded: set[int] = set()

    def copy_in(self, unit: int, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        if slot not in self.ready:  # one event pair per slot, created once
            self.ready[slot], self.done[slot] = torch.cuda.Event(), torch.cuda.Event()
        ready = self.ready[slot]
        with torch.cuda.stream(self.stream):
            if slot in self._done_recorded:
                self.stream.wait_event(self.done[slot])
            dst.copy_(src, non_blocking=self.non_blocking)
            ready.record(self.stream)

    def wait_ready(self, unit: int, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def mark_done(self, unit: int, slot: int) -> None:
        self.done[slot].record(torch.cuda.current_stream(self.device))
        self._done_recorded.add(slot)

    def drain(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()


class RecordingTransport(Transport):
    """CPU transport for tests: logs ("h2d"|"wait"|"done", unit, slot), delays delivery, enforces the rules."""

    parks_on_meta = True

    def __init__(self):
        super().__init__(copy=True)
        self.log: list[tuple] = []
        self._pending: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._holding: dict[int, int] = {}   # slot -> unit whose data arrived there
        self._reading: set[int] = set()      # slots waited on and not yet marked done

    def note(self, *entry) -> None:
        """Let a test interleave its own entries (e.g. ("compute", unit)) with the transport's."""
        self.log.append(tuple(entry))

    def copy_in(self, unit: int, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        if slot in self._reading:
            raise SwapOrderError(f"unit {unit} copied into slot {slot} while unit {self._holding.get(slot)} "
                                 "is still computing from it")
        dst.fill_(0xFF)  # all-ones bytes are NaN in every float format: reading before arrival shows
        self._pending[slot] = (unit, dst, src)
        self._holding.pop(slot, None)
        self.log.append(("h2d", unit, slot))

    def wait_ready(self, unit: int, slot: int) -> None:
        pending = self._pending.pop(slot, None)
        if pending is not None:
            loaded, dst, src = pending
            dst.copy_(src)
            self._holding[slot] = loaded
        if self._holding.get(slot) != unit:
            raise SwapOrderError(f"waited for unit {unit} in slot {slot}, which holds {self._holding.get(slot)}")
        self._reading.add(slot)
        self.log.append(("wait", unit, slot))

    def mark_done(self, unit: int, slot: int) -> None:
        if slot not in self._reading:
            raise SwapOrderError(f"unit {unit} marked done in slot {slot} without waiting for it")
        self._reading.discard(slot)
        self.log.append(("done", unit, slot))

    def drain(self) -> None:
        for slot, (unit, dst, src) in list(self._pending.items()):
            dst.copy_(src)
            self._holding[slot] = unit
        self._pending.clear()


def default_transport(device: torch.device | str, non_blocking: bool = True) -> Transport:
    """The transport for a compute device: CUDA streams on a GPU, synchronous copies elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return CudaTransport(device, non_blocking=non_blocking)
    if device.type != "cpu":
        log.warning("block swap on %s uses synchronous copies (no side stream for this device type)", device)
        transport = Transport()
        transport.device = device
        return transport
    return Transport()
