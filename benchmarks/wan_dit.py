"""Wan DiT forward on CPU: ms per forward and peak RSS per weight precision.

    python benchmarks/wan_dit.py [--model t2v-1.3B|ti2v-5B] [--frames 9 --height 240 --width 416] [--layers N]
    python benchmarks/wan_dit.py --model ti2v-5B --only fp32 --only bf16 --only "int8 W8A8 (bf16 act)"

`--model t2v-1.3B` (default): the Wan 2.1 T2V-1.3B architecture with random weights (no checkpoint
needed), one forward of a 9-frame 240x416 video (latent 3x30x52, 1170 tokens) against 512 text tokens.
`--model ti2v-5B`: the whole Wan 2.2 TI2V-5B architecture (30 blocks of width 3072, 48-channel
latent, the Wan 2.2 VAE's 16x grid) in its image-to-video form: the first latent frame is given, so
every forward runs the per-token timesteps (`denoise_mask`). To keep a 2-core CPU run to minutes it
shrinks the tokens, not the model: a 9-frame 192x320 video (180 tokens; the 512 text tokens of the
cross-attention then cost as much as the video's), so the rows show the full model's weight traffic
and memory. `--layers N` runs the first N blocks only.

Each precision runs in its own subprocess so its peak RSS is its own; fp32 is the baseline the
ratios refer to (the first row run when fp32 is left out). A row whose weights would not fit in the
memory the machine has available right now (fp32 TI2V-5B needs ~20 GB) is reported as skipped
rather than run into the OOM killer, and its worker volunteers as the OOM killer's first victim. Rows: fp32, bf16, bf16 compute with fp8-stored block weights (the loader's fp8
option), and int8 W8A8 block Linears from bf16 (the loader's int8_w8a8 option, ConvRot as loaded).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

from _common import import_package, peak_rss_bytes, run_child

PRECISIONS = {            # name -> (compute dtype, block-weight storage dtype)
    "fp32": ("float32", "float32"),
    "bf16": ("bfloat16", "bfloat16"),
    "fp8 storage, bf16 compute": ("bfloat16", "float8_e4m3fn"),
    "int8 W8A8 (bf16 act)": ("bfloat16", "int8"),
}
MODELS = ("t2v-1.3B", "ti2v-5B")
DEFAULT_LAYERS = {"t2v-1.3B": 30, "ti2v-5B": 30}
GIB = 2**30


def cpu_features() -> str:
    """The CPU model and the vector extensions the int8/bf16 kernels care about, as one line."""
    import torch

    name, flags = platform.processor() or "cpu", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name") and name in ("", "cpu", "x86_64"):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    return f"{name}; torch CPU capability {capability}; " + " ".join(f for f in wanted if f in flags)


def random_model(config, dtype, weight_dtype):
    """Random weights made tensor by tensor directly in their storage dtype (no fp32 detour), at
    the scale of the official init, so activations stay in a realistic range."""
    import torch
    from slipstream.kernels.fp8 import quantize_scaled_fp8
    from slipstream.kernels.precision import is_fp8
    from slipstream.models.wan.dit import WanDiT

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
            sd[key], sd[key.removesuffix("weight") + "weight_scale"] = quantize_scaled_fp8(t, weight_dtype)
        else:
            sd[key] = t.to(weight_dtype if key in quantizable else dtype)
        del t
    return WanDiT.from_state_dict(sd, dtype=dtype, weight_dtype=weight_dtype)


def model_config(name: str, layers: int):
    from dataclasses import replace

    from slipstream.models.wan.config import WAN21_T2V_1_3B, WAN22_TI2V_5B

    full = {"t2v-1.3B": WAN21_T2V_1_3B, "ti2v-5B": WAN22_TI2V_5B}[name]
    return full if layers == full.num_layers else replace(full, num_layers=layers)


def to_int8(model) -> None:
    """The loader's int8_w8a8 conversion: block Linears to W8A8, the rest stays float."""
    from slipstream.kernels.quant_layer import ROTATE_ON_THE_FLY, QuantPlan, convert_linears
    from slipstream.models.quant_presets import BY_NAME

    convert_linears(model, QuantPlan(on_the_fly=True, rotation=ROTATE_ON_THE_FLY, exclude=BY_NAME["wan"].rules()))


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def weight_bytes(config, name: str) -> int:
    """The model's weights in precision `name` (the float model before int8 conversion: its peak)."""
    import torch
    from slipstream.models.wan.dit import WanDiT

    meta = WanDiT.build_meta(config)
    size = torch.finfo(getattr(torch, PRECISIONS[name][0])).bits // 8
    return sum(t.numel() for t in meta.state_dict().values()) * size


def worker(name: str, args) -> dict:
    import torch

    try:       # if memory runs out anyway, this measurement is what the OOM killer should take
        with open("/proc/self/oom_score_adj", "w", encoding="utf-8") as adj:
            adj.write("1000")
    except OSError:
        pass
    import_package()
    dtype, weight_name = PRECISIONS[name][0], PRECISIONS[name][1]
    dtype = getattr(torch, dtype)
    weight_dtype = dtype if weight_name == "int8" else getattr(torch, weight_name)
    torch.manual_seed(0)
    config = model_config(args.model, args.layers)
    model = random_model(config, dtype, weight_dtype)
    if weight_name == "int8":
        to_int8(model)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    _, sh, sw = config.vae_stride
    f, h, w = 1 + (args.frames - 1) // 4, args.height // sh, args.width // sw
    x = torch.randn(1, config.out_dim, f, h, w)
    timestep = torch.tensor([500.0])
    context = torch.randn(1, 512, 4096) * 0.1
    mask = None
    if config.model_type == "ti2v":           # image-to-video: the first latent frame is given (timestep 0)
        mask = torch.ones(1, 1, f, h, w)
        mask[:, :, 0] = 0
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            start = time.perf_counter()
            out = model(x, timestep, context, denoise_mask=mask)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    return {"name": name, "ms": 1000 * min(times), "ms_mean": 1000 * sum(times) / len(times),
            "peak_rss": peak_rss_bytes(), "weights": weights, "tokens": f * h * w // 4,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--layers", type=int, help="transformer blocks (default: all 30)")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, help="default 240 (t2v-1.3B), 192 (ti2v-5B)")
    parser.add_argument("--width", type=int, help="default 416 (t2v-1.3B), 320 (ti2v-5B)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=list(PRECISIONS), action="append", help="run only these rows")
    parser.add_argument("--worker", choices=list(PRECISIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    ti2v = args.model == "ti2v-5B"
    args.layers = args.layers or DEFAULT_LAYERS[args.model]
    args.height = args.height or (192 if ti2v else 240)
    args.width = args.width or (320 if ti2v else 416)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    import_package()
    config = model_config(args.model, args.layers)
    rows, skipped = [], []
    for name in args.only or PRECISIONS:
        need, free = weight_bytes(config, name) + GIB, available_bytes()
        if free is not None and need > free:
            skipped.append(f"{name}: skipped, needs ~{need / GIB:.1f} GiB, {free / GIB:.1f} GiB available")
            continue
        rows.append(run_child(__file__, "--worker", name, "--model", args.model, "--layers", str(args.layers),
                              "--frames", str(args.frames), "--height", str(args.height), "--width",
                              str(args.width), "--warmup", str(args.warmup), "--repeats", str(args.repeats)))
    if not rows:
        raise SystemExit("no precision fits in the memory available: " + "; ".join(skipped))
    base = next((r for r in rows if r["name"] == "fp32"), rows[0])
    r0 = rows[0]
    blocks = (f", {config.num_layers} of 30 blocks" if config.num_layers != 30 else ", all 30 blocks") if ti2v else ""
    timesteps = ", per-token timesteps (first frame given)" if ti2v else ""
    print(f"{config.name} DiT forward{blocks}, CPU, {args.frames} frames {args.height}x{args.width} "
          f"({r0['tokens']} tokens, 512 text tokens{timesteps}), random weights, {r0['threads']} threads, "
          f"best of {args.repeats} after {args.warmup} warm-up")
    print(f"CPU: {cpu_features()}")
    vs = f"vs {base['name'][:5]}"
    print(f"{'precision':<28}{'ms/forward':>12}{vs:>9}{'weights MiB':>13}{'peak RSS MiB':>14}{vs:>9}")
    for r in rows:
        print(f"{r['name']:<28}{r['ms']:>12.0f}{r['ms'] / base['ms']:>8.2f}x{r['weights'] / 2**20:>13.0f}"
              f"{r['peak_rss'] / 2**20:>14.0f}{r['peak_rss'] / base['peak_rss']:>8.2f}x")
    for line in skipped:
        print(line)


if __name__ == "__main__":
    main()
