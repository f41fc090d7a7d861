"""Block swap on a CPU: the schedule observed through the recording transport, bit-exact results,
arrival before compute, order learning, clean-up after errors, planner arithmetic, and RAM stability."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from slipstream.kernels.blockswap import (
    HostBlocks,
    RecordingTransport,
    SwapOrderError,
    SwapPlanError,
    SwapSession,
    Transport,
    max_free_swaps,
    plan_block_swap,
    simulate_swap,
    swap_indices,
    unit_bytes,
)
from torch import nn

pytestmark = pytest.mark.usefixtures("single_thread")


REPO_ROOT = Path(__file__).resolve().parent.parent


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.register_buffer("scale", torch.rand(dim))

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)))) * self.scale


class Stack(nn.Module):
    def __init__(self, n: int = 8, dim: int = 16, order: list[int] | None = None):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(n))
        self.order = list(range(n)) if order is None else order

    def forward(self, x):
        x = self.embed(x)
        for i in self.order:
            x = self.blocks[i](x)
        return x


def _model(n=8, dim=16, order=None, seed=0) -> Stack:
    torch.manual_seed(seed)
    return Stack(n, dim, order).eval()


def _log_computes(model: Stack, transport: RecordingTransport):
    return [b.register_forward_pre_hook(lambda m, a, i=i: transport.note("compute", i))
            for i, b in enumerate(model.blocks)]


def _check_invariants(log: list[tuple], swapped: set[int], depth: int) -> None:
    """Every swapped compute follows wait(unit) which follows its h2d; slots refill only after done."""
    holding: dict[int, int] = {}       # slot -> unit most recently copied in
    arrived: dict[int, int] = {}       # unit -> slot it was waited for in
    reading: set[int] = set()
    for entry in log:
        kind = entry[0]
        if kind == "h2d":
            _, unit, slot = entry
            assert unit in swapped, f"resident unit {unit} was transferred"
            assert slot not in reading, f"slot {slot} refilled while being read"
            assert 0 <= slot <= depth
            holding[slot] = unit
            arrived = {u: s for u, s in arrived.items() if s != slot}
        elif kind == "wait":
            _, unit, slot = entry
            assert holding.get(slot) == unit
            arrived[unit] = slot
            reading.add(slot)
        elif kind == "done":
            _, unit, slot = entry
            reading.discard(slot)
            arrived.pop(unit, None)
        elif kind == "compute":
            _, unit = entry
            if unit in swapped:
                assert unit in arrived, f"unit {unit} computed before it arrived"


def test_swap_indices_spread_evenly():
    assert swap_indices(8, 4) == (1, 3, 5, 7)
    assert swap_indices(40, 10) == (2, 6, 10, 14, 18, 22, 26, 30, 34, 38)
    assert swap_indices(40, 4, "tail") == (36, 37, 38, 39)
    assert swap_indices(30, 30) == tuple(range(30))
    assert swap_indices(30, 0) == ()
    with pytest.raises(ValueError, match="placement"):
        swap_indices(8, 2, "head")


def test_schedule_order_matches_the_design():
    """8 blocks, 1/3/5/7 swapped, prefetch 1: h2d1, h2d3, wait1, done1, h2d5, … and wrap-around."""
    model = _model()
    units = list(model.blocks)
    transport = RecordingTransport()
    host = HostBlocks(units, swapped=(1, 3, 5, 7))
    hooks = []
    with SwapSession(host, units, transport, prefetch=1, root=model) as session:
        hooks = _log_computes(model, transport)
        x = torch.randn(2, 5, 16)
        for _ in range(3):
            model(x)
    for h in hooks:
        h.remove()
    first = [("h2d", 1, 0), ("h2d", 3, 1), ("compute", 0),
             ("wait", 1, 0), ("compute", 1), ("done", 1, 0), ("h2d", 5, 0), ("compute", 2),
             ("wait", 3, 1), ("compute", 3), ("done", 3, 1), ("h2d", 7, 1), ("compute", 4),
             ("wait", 5, 0), ("compute", 5), ("done", 5, 0), ("h2d", 1, 0), ("compute", 6),
             ("wait", 7, 1), ("compute", 7), ("done", 7, 1), ("h2d", 3, 1)]
    assert transport.log[:len(first)] == first
    second = transport.log[len(first):2 * len(first) - 2]
    assert second == first[2:], "the next forward finds its first blocks already prefetched"
    h2d = [e for e in transport.log if e[0] == "h2d"]
    assert len(h2d) == 2 + 3 * 4, "k transfers per forward (plus the initial fill), none for resident blocks"
    assert session.stats()["misses"] == 0
    _check_invariants(transport.log, {1, 3, 5, 7}, depth=1)


@pytest.mark.parametrize("count,prefetch,placement", [(4, 1, "interleaved"), (8, 1, "interleaved"),
                                                      (3, 0, "tail"), (5, 2, "interleaved"), (2, 3, "tail"),
                                                      (0, 1, "interleaved")])
def test_bit_identical_to_no_swap(count, prefetch, placement):
    model = _model()
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        reference = [model(x + i) for i in range(3)]
    swapped = swap_indices(8, count, placement)
    units = list(model.blocks)
    transport = RecordingTransport()
    host = HostBlocks(units, swapped=swapped)
    with torch.no_grad(), SwapSession(host, units, transport, prefetch=prefetch, root=model) as session:
        hooks = _log_computes(model, transport)
        outs = [model(x + i) for i in range(3)]
    for h in hooks:
        h.remove()
    for ref, out in zip(reference, outs, strict=True):
        assert torch.equal(ref, out)
    depth = min(prefetch, max(count - 1, 0))
    _check_invariants(transport.log, set(swapped), depth)
    assert session.stats()["ring_slots"] == (depth + 1 if count else 0)
    with torch.no_grad():
        assert torch.equal(model(x), reference[0]), "weights are whole again after the session"


def test_embedders_can_be_swapped_too():
    model = _model()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        ref = model(x)
    units = [model.embed, *model.blocks]
    host = HostBlocks(units, swapped=(0, 2, 5))
    transport = RecordingTransport()
    with torch.no_grad(), SwapSession(host, units, transport, root=model):
        out = model(x)
    assert torch.equal(ref, out)
    assert ("h2d", 0, 0) in transport.log


def test_block_computed_before_arrival_raises():
    model = _model()
    units = list(model.blocks)
    host = HostBlocks(units, swapped=(2,))
    host.park(2, on_meta=True)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        model(torch.randn(1, 3, 16))
    host.park(2)
    model(torch.randn(1, 3, 16))


def test_skipping_the_wait_reads_poison_and_bad_refills_are_refused():
    transport = RecordingTransport()
    src = torch.arange(8, dtype=torch.uint8)
    dst = torch.zeros(8, dtype=torch.uint8)
    transport.copy_in(0, 0, dst, src)
    assert torch.all(dst == 0xFF), "nothing has arrived before the wait"
    transport.wait_ready(0, 0)
    assert torch.equal(dst, src)
    with pytest.raises(SwapOrderError, match="still computing"):
        transport.copy_in(1, 0, dst, src)
    transport.mark_done(0, 0)
    transport.copy_in(1, 0, dst, src)
    with pytest.raises(SwapOrderError, match="holds"):
        transport.wait_ready(2, 0)
    with pytest.raises(SwapOrderError, match="without waiting"):
        transport.mark_done(1, 1)


def test_execution_order_is_learned_from_the_first_forward():
    order = [7, 6, 5, 4, 3, 2, 1, 0]
    model = _model(order=order)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        ref = model(x)
    units = list(model.blocks)
    transport = RecordingTransport()
    host = HostBlocks(units, swapped=(1, 3, 5, 7))
    with torch.no_grad(), SwapSession(host, units, transport, root=model) as session:
        first = model(x)
        misses_after_first = session.stats()["misses"]
        loads_before = session.stats()["loads"]
        second = model(x)
        loads_before_third = session.stats()["loads"]
        third = model(x)
    assert torch.equal(ref, first) and torch.equal(ref, second) and torch.equal(ref, third)
    assert misses_after_first > 0
    assert session.stats()["order_changes"] == 1
    assert session.stats()["misses"] == misses_after_first, "no misses once the order is learned"
    assert session.stats()["loads"] - loads_before_third == 4, "k loads per forward in the learned order"
    assert loads_before_third - loads_before <= 4 + 1


def test_interrupt_inside_a_forward_leaves_the_model_whole():
    model = _model()
    units = list(model.blocks)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        ref = model(x)
    host = HostBlocks(units, swapped=(1, 3, 5, 7))

    class Stop(Exception):
        pass

    def stop_at_five(unit):
        if unit == 5:
            raise Stop

    with pytest.raises(Stop), torch.no_grad(), \
            SwapSession(host, units, RecordingTransport(), root=model, on_unit=stop_at_five):
        model(x)
    for unit in host.swapped:
        assert all(p.device.type == "cpu" for p in units[unit].parameters())
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        with SwapSession(host, units, RecordingTransport(), root=model):
            assert torch.equal(model(x), ref)


def test_plain_cpu_transport_and_no_root():
    model = _model()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        ref = model(x)
    units = list(model.blocks)
    host = HostBlocks(units, swapped=(0, 4))
    with torch.no_grad(), SwapSession(host, units, Transport(), prefetch=1):
        assert torch.equal(model(x), ref)
        assert torch.equal(model(x), ref)


def test_host_buffers_are_flat_and_rest_moves_elsewhere():
    model = _model()
    units = list(model.blocks)
    host = HostBlocks(units, swapped=(1, 6))
    base = host.buffers[1].untyped_storage().data_ptr()
    for p in units[1].parameters():
        assert p.untyped_storage().data_ptr() == base
    assert host.slot_bytes == unit_bytes(units[1])
    assert host.host_bytes == 2 * unit_bytes(units[1])
    host.move_rest(model, "meta")
    assert all(p.device.type == "cpu" for p in units[1].parameters())
    assert all(p.device.type == "meta" for p in units[0].parameters())
    assert model.embed.weight.device.type == "meta"


def test_unit_bytes_of_a_wan_14b_sized_block_on_meta():
    with torch.device("meta"):
        block = nn.ModuleDict({"q": nn.Linear(5120, 5120), "ffn": nn.Linear(5120, 13824)}).to(torch.bfloat16)
    expected = sum(-(-(p.numel() * 2) // 256) * 256 for p in block.parameters())
    assert unit_bytes(block) == expected
    with pytest.raises(ValueError, match="no weights yet"):
        HostBlocks([block], swapped=(0,))


# ---------------------------------------------------------------- planner


def test_planner_auto_picks_the_fewest_blocks_that_fit():
    gib = 1 << 30
    sizes = [gib // 2] * 40
    plan = plan_block_swap(sizes, free_vram=12 * gib, reserve_bytes=2 * gib, prefetch=1)
    assert plan.resident_bytes + plan.ring_bytes + 2 * gib <= 12 * gib
    fewer = plan_block_swap(sizes, blocks_to_swap=plan.count - 1, prefetch=1)
    assert fewer.resident_bytes + fewer.ring_bytes + 2 * gib > 12 * gib
    assert plan.swapped == swap_indices(40, plan.count)
    assert "block swap" in plan.describe()
    assert plan_block_swap(sizes, free_vram=None).count == 0
    assert plan_block_swap(sizes, free_vram=100 * gib).count == 0


def test_planner_refuses_plans_that_cannot_fit():
    gib = 1 << 30
    with pytest.raises(SwapPlanError, match="does not fit"):
        plan_block_swap([gib] * 10, free_vram=gib, reserve_bytes=gib)
    with pytest.raises(SwapPlanError, match="Swap at least 6 blocks"):
        plan_block_swap([gib] * 10, blocks_to_swap=2, total_vram=6 * gib)
    tight = plan_block_swap([gib] * 10, blocks_to_swap=2, free_vram=4 * gib, total_vram=24 * gib)
    assert "unloaded" in tight.describe()


def test_bandwidth_bound_and_placement():
    assert max_free_swaps(40, 700 << 20, 25e9, 0.1) == 40
    assert max_free_swaps(40, 700, 10.0, 1.0) == 0
    assert max_free_swaps(40, 100, 10.0, 1.0) == 4
    n, t, c = 40, 0.028, 0.010
    base = simulate_swap([c] * n, [t] * n, (), 0)
    assert base == pytest.approx(3 * n * c)
    costs = {}
    for k in (10, 20, 40):
        for placement in ("tail", "interleaved"):
            costs[k, placement] = simulate_swap([c] * n, [t] * n, swap_indices(n, k, placement), 1) / base - 1
    assert costs[10, "interleaved"] < 0.05 < 0.30 < costs[10, "tail"], "interleaving hides copies behind compute"
    assert costs[20, "interleaved"] < costs[20, "tail"]
    assert costs[40, "tail"] == pytest.approx(costs[40, "interleaved"])
    ordered = [costs[k, "interleaved"] for k in (10, 20, 40)]
    assert ordered == sorted(ordered), "overhead grows with the number of swapped blocks"
    cheap = simulate_swap([0.06] * n, [0.014] * n, swap_indices(n, 40), 1) / simulate_swap([0.06] * n, [0.014] * n,
                                                                                           (), 0) - 1
    assert cheap < 0.01, "copies shorter than compute cost (almost) nothing"
    plan = plan_block_swap([700 << 20] * 40, blocks_to_swap=20, bandwidth=25e9, block_seconds=0.1)
    assert plan.max_free_swaps == 40 and plan.predicted_overhead < 0.01


def test_ram_does_not_grow_over_repeated_runs():
    """Run 12 sessions of 3 forwards in a fresh process; RSS must not climb from the 4th to the 12th.

    A leak of the swapped blocks' host buffers or device slots would add at least one block per
    session (8+ blocks over the window); allocator noise under a loaded machine stays within a few.
    """
    script = textwrap.dedent(f"""
        import gc, json, sys, psutil, torch
        sys.path.insert(0, {str(REPO_ROOT.parent)!r})
        sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})
        import conftest  # noqa  (imports the repo as `slipstream`)
        from slipstream.kernels.blockswap import HostBlocks, SwapSession, Transport
        import test_wan_blockswap as t
        torch.set_num_threads(1)
        model = t._model(n=8, dim=384)
        units = list(model.blocks)
        host = HostBlocks(units, swapped=(1, 3, 5, 7))
        x = torch.randn(1, 16, 384)
        rss = []
        with torch.no_grad():
            for run in range(12):
                with SwapSession(host, units, Transport(), prefetch=1, root=model):
                    for _ in range(3):
                        model(x)
                gc.collect()
                rss.append(psutil.Process().memory_info().rss)
        print(json.dumps({{"rss": rss, "block": host.slot_bytes}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=str(REPO_ROOT))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    growth = data["rss"][-1] - data["rss"][3]
    assert growth < 3 * data["block"], f"RSS grew by {growth} bytes over 8 runs (one block is {data['block']})"


def test_planner_on_the_real_wan_14b_block_size():
    """Full-size blocks on `meta` (no memory): the official 351,394,304 parameters per 14B T2V block."""
    from slipstream.models.wan.config import WAN21_T2V_14B
    from slipstream.models.wan.dit import WanDiT

    dit = WanDiT.build_meta(WAN21_T2V_14B).to(torch.bfloat16)
    sizes = [unit_bytes(block) for block in dit.blocks]
    assert len(sizes) == 40
    assert 351_394_304 * 2 <= sizes[0] < 351_394_304 * 2 + 256 * 40
    gib = 1 << 30
    plan = plan_block_swap(sizes, free_vram=22 * gib, reserve_bytes=4 * gib, bandwidth=25e9, block_seconds=0.1)
    assert 0 < plan.count < 40 and plan.resident_bytes + plan.ring_bytes <= 18 * gib
    assert plan.max_free_swaps == 40 and plan.predicted_overhead < 0.01, "video-length blocks hide their copies"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_transport_is_bit_identical_and_keeps_ram_steady():
    from slipstream.kernels.blockswap import CudaTransport

    model = _model(n=8, dim=256)
    x = torch.randn(2, 64, 256, device="cuda")
    with torch.no_grad():
        ref = model.cuda()(x)
    model.cpu()
    units = list(model.blocks)
    host = HostBlocks(units, swapped=(0, 2, 4, 6))
    assert host.pinned_bytes == host.host_bytes
    host.move_rest(model, "cuda")
    for _ in range(3):
        with torch.no_grad(), SwapSession(host, units, CudaTransport("cuda"), prefetch=1, root=model) as session:
            outs = [model(x) for _ in range(3)]
        assert all(torch.equal(ref, out) for out in outs)
        assert session.stats()["misses"] == 0
    assert all(p.device.type == "cpu" for i in host.swapped for p in units[i].parameters())
    host.release()
