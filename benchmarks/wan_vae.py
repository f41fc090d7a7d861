"""Wan 2.1 VAE decode on CPU: seconds and peak RSS, whole frame vs spatial tiles.

    flock /work/heavy.lock python benchmarks/wan_vae.py [--latent-frames 2 --size 320 --tile 16 --overlap 4]

The full-size VAE with random weights (no checkpoint needed) decodes a latent of `latent-frames`
frames (1+4(n-1) video frames) of size x size pixels. Each row runs in its own subprocess so its
peak RSS is its own; the untiled decode is the baseline the ratios refer to. Tiling trades time
(overlaps are decoded twice) for a peak that follows the tile size instead of the frame size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_package():
    """The repository as package `slipstream` (as ComfyUI and the tests import it)."""
    if "slipstream" not in sys.modules:
        spec = importlib.util.spec_from_file_location("slipstream", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["slipstream"] = module
        spec.loader.exec_module(module)


def peak_rss() -> int:
    """VmHWM: this process's resident high-water mark in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def random_vae(dtype):
    import torch
    from slipstream.models.wan.vae import WanVAE
    from slipstream.models.wan.weights import build_on_meta

    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, value in build_on_meta(lambda: WanVAE()).state_dict().items():
        if key.endswith("gamma"):
            sd[key] = torch.ones(value.shape, dtype=dtype)
        else:
            fan_in = max(1, value[0].numel()) if value.dim() > 1 else 1
            sd[key] = (torch.randn(value.shape, generator=gen) / fan_in ** 0.5).to(dtype)
    return WanVAE.from_state_dict(sd)


def run_one(args) -> dict:
    """Decode once in this process and report time and the RSS the decode added."""
    import_package()
    import torch
    from slipstream.models.wan.tiling import Tiling

    vae = random_vae(getattr(torch, args.dtype))
    lat = args.size // 8
    z = torch.randn((1, 16, args.latent_frames, lat, lat), generator=torch.Generator().manual_seed(1))
    tiling = Tiling(tile=args.tile, overlap=args.overlap) if args.tiled else None
    vae.decode(z[:, :, :1, :8, :8])  # warm-up: kernels, allocator
    before = peak_rss()
    start = time.perf_counter()
    video = vae.decode(z, tiling=tiling)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": peak_rss() - before, "shape": list(video.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent-frames", type=int, default=2)
    parser.add_argument("--size", type=int, default=320, help="frame width and height in pixels (multiple of 8)")
    parser.add_argument("--tile", type=int, default=16, help="tile size in latent pixels (x8 px)")
    parser.add_argument("--overlap", type=int, default=4, help="tile overlap in latent pixels")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return

    common = [f"--latent-frames={args.latent_frames}", f"--size={args.size}", f"--tile={args.tile}",
              f"--overlap={args.overlap}", f"--dtype={args.dtype}", "--child"]
    rows = {"whole frame": [], f"tiles {args.tile * 8}px, overlap {args.overlap * 8}px": ["--tiled"]}
    results = {}
    for name, extra in rows.items():
        out = subprocess.run([sys.executable, __file__, *common, *extra], capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    frames = 1 + 4 * (args.latent_frames - 1)
    print(f"Wan 2.1 VAE decode, CPU, {args.dtype}, {frames} frames of {args.size}x{args.size} "
          f"(latent {args.latent_frames}x{args.size // 8}x{args.size // 8}), random weights")
    print(f"{'mode':<28} {'seconds':>8} {'time ratio':>10} {'peak RSS MiB':>13} {'RSS ratio':>9}")
    base = results["whole frame"]
    for name, r in results.items():
        print(f"{name:<28} {r['seconds']:>8.2f} {r['seconds'] / base['seconds']:>10.2f} "
              f"{r['peak'] / 2**20:>13.0f} {r['peak'] / max(1, base['peak']):>9.2f}")


if __name__ == "__main__":
    main()
