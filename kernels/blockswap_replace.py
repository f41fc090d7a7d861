"""Block swap for a model whose weights another model manager owns (ComfyUI's ModelPatcher).

kernels/blockswap.py streams flat host copies into device slots and re-points `.data`; that needs
to own the weights. Inside ComfyUI the patcher owns them: it patches LoRAs into them in place, keeps
backups and restores Parameters on unpatch, so re-pointed storage would go stale. Here the blocks
stay ordinary modules and are moved whole instead: a swapped block waits on the offload device,
goes to the main device just before it runs and back right after, through a per-block "replace"
patch (the `patches_replace["dit"][("double_block", i)]` hook ComfyUI's Wan model honours, set
on a clone of the MODEL — nothing global is patched). `prefetch` more swapped blocks are sent
ahead, so with pinned memory and non-blocking copies the transfer overlaps the previous block.

    swap = ModuleBlockSwap(model.blocks, swapped=(1, 3), device=cuda, offload=cpu, prefetch=1)
    swap.park()                                  # after the manager loaded the model
    patch = swap.patch(3)                        # patch(args, {"original_block": fn}) -> fn(args)

Every move is counted and every block run records which swapped blocks were resident, so the
schedule is checked on a CPU (where the moves change no device) as well as on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SwapLog:
    """What the swap did: moves each way, and per block run the swapped blocks that were resident."""

    moves_in: int = 0
    moves_out: int = 0
    runs: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    keep: int = 256                 # runs kept (a long video runs thousands of blocks)

    def ran(self, index: int, resident: set[int]) -> None:
        if len(self.runs) < self.keep:
            self.runs.append((index, tuple(sorted(resident))))


class ModuleBlockSwap:
    """Shared state of one MODEL's block patches: which blocks swap, where each one is now."""

    def __init__(self, blocks: Sequence[nn.Module], swapped: Sequence[int], device: torch.device | str,
                 offload: torch.device | str, prefetch: int = 0, non_blocking: bool = False,
                 move: Callable[[nn.Module, torch.device, bool], None] | None = None):
        count = len(blocks)
        bad = [i for i in swapped if not 0 <= i < count]
        if bad:
            raise ValueError(f"block swap: blocks {bad} do not exist (the model has {count}, 0-{count - 1})")
        if prefetch < 0:
            raise ValueError(f"block swap: prefetch must be >= 0, got {prefetch}")
        self.blocks = blocks
        self.swapped = tuple(sorted(set(swapped)))
        self.device = torch.device(device)
        self.offload = torch.device(offload)
        self.prefetch = prefetch
        self.non_blocking = non_blocking
        self._move = move or _move_module
        self.resident: set[int] = set()      # swapped blocks on the main device now
        self.log = SwapLog()
        self._next = {a: self.swapped[n + 1:n + 1 + prefetch] for n, a in enumerate(self.swapped)}

    @property
    def moves_real(self) -> bool:
        """False when both devices are the same one (a CPU run): moves are then counted, not made."""
        return self.device != self.offload

    def _to(self, index: int, where: torch.device) -> None:
        if self.moves_real:
            self._move(self.blocks[index], where, self.non_blocking)

    def bring(self, index: int) -> None:
        if index not in self.resident:
            self._to(index, self.device)
            self.resident.add(index)
            self.log.moves_in += 1

    def send_back(self, index: int) -> None:
        if index in self.resident:
            self._to(index, self.offload)
            self.resident.discard(index)
            self.log.moves_out += 1

    def park(self) -> None:
        """Every swapped block to the offload device (after the manager loaded the whole model)."""
        for index in self.swapped:
            self._to(index, self.offload)
        self.resident.clear()

    def run(self, index: int, block: Callable[[], dict]) -> dict:
        """Run block `index` (`block()` computes it) with its weights on the main device."""
        swapped = index in self._next
        if swapped:
            self.bring(index)
            for ahead in self._next[index]:
                self.bring(ahead)
        self.log.ran(index, self.resident)
        try:
            return block()
        finally:
            if swapped:
                self.send_back(index)

    def patch(self, index: int) -> BlockPatch:
        return BlockPatch(self, index)


class BlockPatch:
    """ComfyUI's replace-patch signature: patch(args, {"original_block": fn}) -> fn(args)'s output.

    Copying a MODEL deep-copies its options; the patch keeps pointing at the same swap state (the
    clones share the same modules), so deepcopy returns the patch itself.
    """

    def __init__(self, swap: ModuleBlockSwap, index: int):
        self.swap = swap
        self.index = index

    def __call__(self, args: dict, extra: dict) -> dict:
        original = extra["original_block"]
        return self.swap.run(self.index, lambda: original(args))

    def __deepcopy__(self, memo: dict) -> BlockPatch:
        return self

    def __repr__(self) -> str:
        return f"BlockPatch(block {self.index} of {len(self.swap.blocks)})"


def _move_module(module: nn.Module, device: torch.device, non_blocking: bool) -> None:
    module.to(device, non_blocking=non_blocking)
