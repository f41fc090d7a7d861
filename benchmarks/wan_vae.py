"""Wan 2.1 VAE decode on CPU: seconds and peak RSS, whole frame vs spatial tiles.

    python benchmarks/wan_vae.py [--latent-frames 2 --size 320 --tile 16 --overlap 4]

The full-size VAE with random weights (no checkpoint needed) decodes a latent of `latent-frames`
frames (1+4(n-1) video frames) of size x size pixels. Each row runs in its own subprocess so its
peak RSS is its own; the untiled decode is the baseline the ratios refer to. Tiling trades time
(overlaps are decoded twice) for a peak that follows the tile size instead of the frame size.
"""

from __future__ import annotations

import argparse
import json
import time

from _common import MIB, import_package, peak_rss_bytes, print_table, run_child


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
    before = peak_rss_bytes()
    start = time.perf_counter()
    video = vae.decode(z, tiling=tiling)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": peak_rss_bytes() - before, "shape": list(video.shape)}


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
    results = {name: run_child(__file__, *common, *extra) for name, extra in rows.items()}
    frames = 1 + 4 * (args.latent_frames - 1)
    print(f"Wan 2.1 VAE decode, CPU, {args.dtype}, {frames} frames of {args.size}x{args.size} "
          f"(latent {args.latent_frames}x{args.size // 8}x{args.size // 8}), random weights")
    base = results["whole frame"]
    print_table(["mode", "seconds", "time ratio", "peak RSS MiB", "RSS ratio"],
                [(name, r["seconds"], r["seconds"] / base["seconds"], r["peak"] / MIB, r["peak"] / max(1, base["peak"]))
                 for name, r in results.items()], ["", ".2f", ".2f", ".0f", ".2f"])

if __name__ == "__main__":
    main()
