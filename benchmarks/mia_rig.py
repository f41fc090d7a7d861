"""MIA rig benchmark: seconds per pipeline stage for a 32,768-point rig, and network load time.

Full-size networks (the published architecture, ~582M parameters in all) with random weights are
written once to a temporary safetensors cache in the layout MIA: Load Model uses; the script then
times loading all five from that cache and rigging the procedural humanoid at 32,768 points.
Random weights give a random rig, but the work per stage is the real work. Run it alone:

    python benchmarks/mia_rig.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import import_package, print_table

import_package()

import torch  # noqa: E402
from slipstream.kernels.precision import dtype_name, resolve_dtype  # noqa: E402
from slipstream.models.mia.humanoid import make_humanoid  # noqa: E402
from slipstream.models.mia.networks import NETWORK_NAMES, build_network  # noqa: E402
from slipstream.models.mia.rig import STAGES, MIANetworks, rig_mesh  # noqa: E402
from slipstream.models.mia.weights import load_network, save_network_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--runs", type=int, default=1, help="rigs to time after one warm-up rig")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.precision, device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="mia_bench_") as cache:
        t0 = time.perf_counter()
        for name in NETWORK_NAMES:
            net = build_network(name)
            save_network_file(net.state_dict(), name, net.cfg, os.path.join(cache, f"{name}.safetensors"))
            del net
        prep = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
        load_times = {}
        nets = {}
        for name in NETWORK_NAMES:
            t = time.perf_counter()
            nets[name] = load_network(os.path.join(cache, f"{name}.safetensors"), name, dtype, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            load_times[name] = time.perf_counter() - t
    handle = MIANetworks(nets["joints_coarse"], nets["bw"], nets["bw_normal"], nets["joints"], nets["pose"],
                         dtype, device, "sdpa")
    mesh = make_humanoid()
    rig_mesh(handle, mesh)  # warm-up
    runs = []
    for _ in range(args.runs):
        t = time.perf_counter()
        result = rig_mesh(handle, mesh)
        runs.append((time.perf_counter() - t, result.timings))

    print(f"MIA rig benchmark — device {device}, {dtype_name(dtype)}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces; points per cloud: {handle.num_points}")
    print(f"random-weight cache: {size / 1e9:.2f} GB written in {prep:.1f}s (setup, not timed below)")
    print()
    print_table(["network", "load from safetensors (s)"],
                [*load_times.items(), ("all five", sum(load_times.values()))],
                ["", ".2f"])
    print()
    total = sum(r[0] for r in runs) / len(runs)
    stages = [(stage, sum(r[1][stage] for r in runs) / len(runs)) for stage in STAGES]
    print_table(["stage", f"seconds (mean of {len(runs)})", "share"],
                [*((stage, sec, sec / total) for stage, sec in stages), ("total", total, 1.0)], ["", ".2f", ".0%"])

if __name__ == "__main__":
    main()
