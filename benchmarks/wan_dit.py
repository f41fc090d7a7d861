"""Wan 2.1 DiT forward on CPU: ms per forward and peak RSS per weight precision.

    flock /work/heavy.lock python benchmarks/wan_dit.py [--frames 9 --height 240 --width 416]

The T2V-1.3B architecture with random weights (no checkpoint needed), one forward of a
9-frame 240x416 video (latent 3x30x52, 1170 tokens) against 512 text tokens. Each precision runs
in its own subprocess so its peak RSS is its own; fp32 is the baseline the ratios refer to.
Rows: fp32, bf16, and bf16 compute with fp8-stored block weights (the loader's fp8 option).
"""

from __future__ import annotations

import argparse
import json
import math
import time

from _common import import_package, peak_rss_bytes, run_child

PRECISIONS = {            # name -> (compute dtype, block-weight storage dtype)
    "fp32": ("float32", "float32"),
    "bf16": ("bfloat16", "bfloat16"),
    "fp8 storage, bf16 compute": ("bfloat16", "float8_e4m3fn"),
}


def random_model(config, dtype, weight_dtype):
    """Random weights made tensor by tensor directly in their storage dtype (no fp32 detour), at
    the scale of the official init, so activations stay in a realistic range."""
    import torch
    from slipstream.kernels.precision import is_fp8
    from slipstream.models.wan.dit import WanDiT
    from slipstream.models.wan.layers import quantize_fp8

    gen = torch.Generator().manual_seed(0)
    meta = WanDiT.build_meta(config)
    quantizable = set(meta.quantizable_keys())
    sd = {}
    for key, value in meta.state_dict().items():
        shape = tuple(value.shape)
        # drawn straight in the compute dtype: fp32 temporaries would fragment the heap and
        # inflate the peak RSS this benchmark reports
        if key.endswith("modulation"):
            t = torch.randn(shape, generator=gen, dtype=dtype) / math.sqrt(config.dim)
        elif len(shape) >= 2:
            t = torch.rand(shape, generator=gen, dtype=dtype).mul_(2).sub_(1).div_(math.sqrt(math.prod(shape[1:])))
        elif key.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.randn(shape, generator=gen, dtype=dtype).mul_(0.01)
        if key in quantizable and is_fp8(weight_dtype):     # what the loader's fp8 option stores
            sd[key], sd[key.removesuffix("weight") + "weight_scale"] = quantize_fp8(t, weight_dtype)
        else:
            sd[key] = t.to(weight_dtype if key in quantizable else dtype)
        del t
    return WanDiT.from_state_dict(sd, dtype=dtype, weight_dtype=weight_dtype)


def worker(name: str, args) -> dict:
    import torch

    import_package()
    from slipstream.models.wan.config import WAN21_T2V_1_3B

    dtype, weight_dtype = (getattr(torch, n) for n in PRECISIONS[name])
    torch.manual_seed(0)
    model = random_model(WAN21_T2V_1_3B, dtype, weight_dtype)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    f, h, w = 1 + (args.frames - 1) // 4, args.height // 8, args.width // 8
    x = torch.randn(1, 16, f, h, w)
    timestep = torch.tensor([500.0])
    context = torch.randn(1, 512, 4096) * 0.1
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            start = time.perf_counter()
            out = model(x, timestep, context)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    return {"name": name, "ms": 1000 * min(times), "ms_mean": 1000 * sum(times) / len(times),
            "peak_rss": peak_rss_bytes(), "weights": weights, "tokens": f * h * w // 4,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=416)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=list(PRECISIONS), action="append", help="run only these rows")
    parser.add_argument("--worker", choices=list(PRECISIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = [run_child(__file__, "--worker", name, "--frames", str(args.frames), "--height", str(args.height),
                      "--width", str(args.width), "--warmup", str(args.warmup), "--repeats", str(args.repeats))
            for name in args.only or PRECISIONS]
    base = next((r for r in rows if r["name"] == "fp32"), rows[0])
    r0 = rows[0]
    print(f"Wan2.1-T2V-1.3B DiT forward, CPU, {args.frames} frames {args.height}x{args.width} "
          f"({r0['tokens']} tokens, 512 text tokens), random weights, {r0['threads']} threads, "
          f"best of {args.repeats} after {args.warmup} warm-up")
    print(f"{'precision':<28}{'ms/forward':>12}{'vs fp32':>9}{'weights MiB':>13}{'peak RSS MiB':>14}{'vs fp32':>9}")
    for r in rows:
        print(f"{r['name']:<28}{r['ms']:>12.0f}{r['ms'] / base['ms']:>8.2f}x{r['weights'] / 2**20:>13.0f}"
              f"{r['peak_rss'] / 2**20:>14.0f}{r['peak_rss'] / base['peak_rss']:>8.2f}x")


if __name__ == "__main__":
    main()
