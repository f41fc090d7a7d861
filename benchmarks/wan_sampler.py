"""Wan sampler costs, as ratios against a baseline measured in the same run (CPU, random weights).

1. Sampler overhead per step: `sample_video` (solver, CFG batching, seeding, interrupt checks,
   progress) against the same number of bare DiT forwards of the same batch. Goal: < 3 %.
2. Context windows: seconds per step for growing frame counts with a fixed window; the cost per
   window should stay flat (cost linear in the number of windows).
3. Block swap on CPU against no swap, every block swapped (prefetch 1): the schedule's own cost
   (hooks, slot bookkeeping, re-pointing weights; copies elided) — goal < 2 % — and, for reference,
   with the host-to-slot memcpy a CPU has to do inline (on a GPU that copy runs on the copy engine,
   overlapped with compute).

4. Step caches (TeaCache, MagCache, EasyCache), each at its default threshold and at twice it:
   forwards computed, wall (and process CPU) time of a whole sampling run against the same run
   without a cache, the PSNR of the final latent against the uncached one (same seed), and the error
   as a share of what the model contributes (||latent - uncached|| / ||uncached - starting noise||;
   the solver leaves the noise unchanged without the model, so that PSNR of the noise itself is the
   floor any PSNR must be read against). TeaCache and MagCache run twice: with the published Wan 2.1
   tables and calibrated on an uncached run of this model with another seed and prompt
   (models/wan/cache_calibration.py, the papers' own calibration procedures). Model: the Wan 1.3B
   architecture (30 blocks, 128-wide heads, t2v) with random weights at reduced width (dim 256).
   50 UniPC steps (the official T2V count, which the published tables are made for). Goal: >= 2x
   at the default threshold with the quality reported.

   Why random weights cannot show the goal honestly: a trained model's velocity changes slowly
   through the middle of the schedule (flow-matching paths are nearly straight) and that is what
   every cache exploits; this model's output changes by ~15% (relative L1) per step of 50 and its
   time modulation e0 by ~55%, printed under the table. So (a) the published TeaCache polynomial,
   fitted to real Wan e0 changes, maps these e0 changes to tiny predictions and skips nearly every
   step (a large, meaningless speed-up): only the calibrated rows mean something; (b) EasyCache
   (core's formula and default 0.2) predicts each step's output change as about the output's own
   change, ~0.15 here: under 0.2, so one step is reused, but a second in a row adds ~0.3 (the change
   since the last computed step, two steps' worth), so it reuses about every other step — a pattern
   set by this model's fast-moving output; on the trajectory of an exact flow-matching denoiser it
   reuses 22 of 30 steps at 0.2 for a 3.3% error (tests/test_wan_cache_calibration.py); (c)
   MagCache's speed-up at its defaults (K = 2 in a row, the first 20% of steps kept) is capped at
   50 / 24 ≈ 2.08x in forwards over 50 steps whatever the model, by construction; its blocks-only skip
   still runs the embeddings and head. The thresholds are the published defaults, not tuned to this
   model; wall times move by ~10% with the machine's load, the forward counts do not.

Each figure of sections 1-3 is the best process CPU time of several round-robin repetitions after a warm-up
(with --threads 1, the default, CPU time is the work done whatever else the machine runs). The model is a Wan 2.1 DiT with
the real structure at reduced width (dim 512, 4 blocks, 128-wide heads).

Run under the shared lock so heavy jobs do not overlap:
    python benchmarks/wan_sampler.py [--only caches]
"""

from __future__ import annotations

import argparse
import math
import time

from _common import best_times, cpu_features, import_package

import_package()

import torch  # noqa: E402
from slipstream.kernels.blockswap import HostBlocks, SwapSession, Transport  # noqa: E402
from slipstream.models.wan.cache_calibration import (  # noqa: E402
    CacheRecorder,
    fit_teacache,
    mag_ratio_curve,
    teacache_pairs,
)
from slipstream.models.wan.config import WanDiTConfig  # noqa: E402
from slipstream.models.wan.context import ContextOptions, context_windows  # noqa: E402
from slipstream.models.wan.dit import WanDiT, random_state_dict  # noqa: E402
from slipstream.models.wan.pipeline import (  # noqa: E402
    RunStats,
    SamplerSettings,
    SamplingExtras,
    WanImageEmbeds,
    WanModelHandle,
    WanTextEmbeds,
    initial_noise,
    sample_video,
)
from slipstream.models.wan.step_cache import DEFAULT_THRESHOLDS, CacheArgs  # noqa: E402

CPU = torch.device("cpu")


def build_model(dim: int, layers: int, text_len: int) -> WanDiT:
    cfg = WanDiTConfig("bench", "t2v", dim=dim, ffn_dim=2 * dim, num_heads=dim // 128, num_layers=layers,
                       text_dim=64, text_len=text_len)
    dit = WanDiT(cfg).eval().requires_grad_(False)
    dit.load_state_dict(random_state_dict(cfg, seed=0))
    return dit


def bench_sampler_overhead(dit: WanDiT, size: int, frames: int, steps: int, repeats: int) -> list[tuple]:
    handle = WanModelHandle(dit, "bench", CPU)
    text = WanTextEmbeds((torch.randn(12, 64),), torch.randn(8, 64))
    image = WanImageEmbeds(size, size, frames)
    shape = image.latent_shape
    rows = []
    for cfg, batch in ((1.0, 1), (5.0, 2)):
        settings = SamplerSettings(steps=steps, cfg=cfg, seed=1, batched_cfg="on")
        x = torch.randn(batch, *shape)
        ctx = torch.randn(batch, 12, 64)

        def bare(x=x, ctx=ctx, batch=batch):
            with torch.no_grad():
                for t in range(steps):
                    dit(x, torch.full((batch,), 900.0 - t), ctx)

        def ours(settings=settings):
            sample_video(handle, text, image, settings, device=CPU, force_offload=False,
                         progress=lambda *_: None, check_interrupt=lambda: None)

        base, mine = best_times([bare, ours], repeats)
        rows.append((f"cfg {cfg:g} (batch {batch})", base / steps, mine / steps, mine / base - 1.0))
    return rows


def bench_context(dit: WanDiT, size: int, window_px: int, frame_counts: list[int], repeats: int) -> list[tuple]:
    handle = WanModelHandle(dit, "bench", CPU)
    text = WanTextEmbeds((torch.randn(12, 64),), torch.randn(8, 64))
    options = ContextOptions("static_standard", window_px, 4, 8, freenoise=True)
    size_lat, stride, overlap = options.latent()
    settings = SamplerSettings(steps=1, cfg=1.0, seed=1)
    runs, counts = [], []
    for frames in frame_counts:
        image = WanImageEmbeds(size, size, frames)
        counts.append((frames, image.latent_shape[1],
                       len(context_windows("static_standard", 0, image.latent_shape[1], size_lat, stride, overlap))))

        def run(image=image):
            sample_video(handle, text, image, settings, device=CPU, context=options, force_offload=False)

        runs.append(run)
    rows = []
    first = None
    for (frames, latent, windows), per_step in zip(counts, best_times(runs, repeats), strict=True):
        per_window = per_step / windows
        first = first or per_window
        rows.append((frames, latent, windows, per_step, per_window, per_window / first))
    return rows


def bench_block_swap(dit: WanDiT, size: int, frames: int, repeats: int) -> list[tuple]:
    image = WanImageEmbeds(size, size, frames)
    x = torch.randn(2, *image.latent_shape)
    ctx = torch.randn(2, 12, 64)
    t = torch.full((2,), 900.0)
    forwards = 4

    def run():
        with torch.no_grad():
            for _ in range(forwards):
                dit(x, t, ctx)

    units = list(dit.blocks)
    host = HostBlocks(units, swapped=range(len(units)), pin=False)  # same weight memory for every row
    def swapped(copy: bool):
        def go():
            with SwapSession(host, units, Transport(copy=copy), prefetch=1, root=dit):
                run()
        return go

    base, elided, copied = best_times([run, swapped(False), swapped(True)], repeats)
    return [("no swap", base / forwards, 0.0),
            ("all blocks, schedule only (copies elided)", elided / forwards, elided / base - 1.0),
            ("all blocks, with inline CPU memcpy", copied / forwards, copied / base - 1.0)]


class _NoMathBlock(torch.nn.Module):
    """A real Wan block's 27 tensors (width 128) with a forward that returns its input."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.inner = block

    def forward(self, x):
        return x


class _Chain(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def bench_swap_bookkeeping(repeats: int) -> float:
    """Seconds the swap schedule adds per swapped block (pre/post hooks, slot bookkeeping, re-pointing
    every tensor to its slot and back), with no arithmetic to hide it."""
    chain = _Chain(_NoMathBlock(b) for b in build_model(dim=128, layers=8, text_len=1).blocks)
    x = torch.zeros(1)
    forwards = 500

    def run():
        for _ in range(forwards):
            chain(x)

    units = list(chain.blocks)
    host = HostBlocks(units, swapped=range(len(units)), pin=False)

    def swapped():
        with SwapSession(host, units, Transport(copy=False), prefetch=1, root=chain):
            run()

    base, with_swap = best_times([run, swapped], repeats)
    return (with_swap - base) / (forwards * len(units))


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB, the peak being the reference's value range."""
    mse = (x - ref).double().pow(2).mean().item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _cache_model():
    cfg = WanDiTConfig("bench-1.3B-arch", "t2v", dim=256, ffn_dim=1536, num_heads=2, num_layers=30,
                       text_dim=64, text_len=64)
    dit = WanDiT(cfg).eval().requires_grad_(False)
    dit.load_state_dict(random_state_dict(cfg, seed=0))
    return dit


def calibrate_caches(handle: WanModelHandle, image: WanImageEmbeds, steps: int) -> tuple[dict, dict]:
    """TeaCache and MagCache calibration (models/wan/cache_calibration.py) from one uncached run with
    another seed and other prompts than the measured runs, so the caches are not fitted to the very
    trajectory they are judged on; also the run's figures that explain the caches' decisions."""
    g = torch.Generator().manual_seed(7)
    text = WanTextEmbeds((torch.randn(12, 64, generator=g),), torch.randn(8, 64, generator=g))
    settings = SamplerSettings(steps=steps, cfg=5.0, shift=5.0, seed=2, scheduler="unipc", batched_cfg="on")
    with CacheRecorder(handle.dit) as recorder:
        sample_video(handle, text, image, settings, device=CPU, force_offload=False)
    e0_change, out_change = teacache_pairs(recorder.traces)
    ratios = mag_ratio_curve(recorder.traces)
    facts = {"e0": sorted(e0_change)[len(e0_change) // 2], "out": sorted(out_change)[len(out_change) // 2],
             "mag": (min(ratios[2:]), max(ratios[2:]))}
    return {"coefficients": fit_teacache(recorder.traces), "mag_ratios": ratios}, facts


def bench_caches(steps: int, repeats: int) -> tuple[list[tuple], dict]:
    """Each cache at its default threshold (and at twice it), driven by the published Wan tables and by a
    calibration on this model, against the uncached run: forwards computed, wall and process CPU time
    (the machine may be shared: CPU time is the steadier figure), PSNR of the final latent."""
    handle = WanModelHandle(_cache_model(), "bench", CPU)
    text = WanTextEmbeds((torch.randn(12, 64),), torch.randn(8, 64))
    image = WanImageEmbeds(128, 128, 17)
    settings = SamplerSettings(steps=steps, cfg=5.0, shift=5.0, seed=1, scheduler="unipc", batched_cfg="on")
    calibration, facts = calibrate_caches(handle, image, steps)
    variants = [("none", "-", None, None)]
    for method in ("teacache", "magcache", "easycache"):
        default = DEFAULT_THRESHOLDS[method]
        if method != "easycache":
            variants.append((method, "published", default, CacheArgs(method, default)))
        tables = "calibrated" if method != "easycache" else "(runtime)"
        extra = {k: v for k, v in calibration.items() if (k == "coefficients") == (method == "teacache")} \
            if method != "easycache" else {}
        for threshold in (default, 2 * default):
            variants.append((method, tables, threshold, CacheArgs(method, threshold, **extra)))
    results = {}
    for _ in range(repeats):          # round-robin: every variant sees the same machine load
        for name, tables, threshold, args in variants:
            stats = RunStats()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = sample_video(handle, text, image, settings, device=CPU, force_offload=False, stats=stats,
                               extras=SamplingExtras(cache_args=args))
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            best = results.get((name, tables, threshold))
            if best is None or cpu < best[1]:
                results[(name, tables, threshold)] = (wall, cpu, out, stats)
    base_wall, base_cpu, base_out, base_stats = results[("none", "-", None)]
    # What the model contributes to the latent: the solver moves nothing without it (v = 0 keeps x at the noise).
    noise = initial_noise(image.latent_shape, settings.seed, None).reshape(base_out.shape)
    contribution = (base_out - noise).norm()
    facts["floor"] = psnr(noise, base_out)
    rows = []
    for name, tables, threshold, _ in variants:
        wall, cpu, out, stats = results[(name, tables, threshold)]
        rows.append((name, tables, "-" if threshold is None else f"{threshold:g}",
                     f"{stats.branches_computed}/{base_stats.branches_computed}", wall, base_wall / wall, cpu,
                     base_cpu / cpu, "inf" if name == "none" else f"{psnr(out, base_out):.1f}",
                     f"{100 * float((out - base_out).norm() / contribution):.1f}%"))
    return rows, facts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["caches"], default=None, help="run one section only")
    parser.add_argument("--cache-steps", type=int, default=50)
    parser.add_argument("--cache-repeats", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {cpu_features()}")
    if args.only != "caches":
        run_cost_sections(args)
    print(f"\n## 4. Step caches (Wan 1.3B architecture: 30 blocks, dim 256, 2 heads of 128; 128x128 px, 17 frames "
          f"= 5x16x16 latent, 320 tokens; {args.cache_steps} UniPC steps, cfg 5, same seed; best of "
          f"{args.cache_repeats})")
    print("(both CFG branches as one batch in every run; a cache skips a step when both branches may. 'published': "
          "the Wan 2.1 tables; 'calibrated': fitted on an uncached run of this model with another seed and prompt.)")
    rows, facts = bench_caches(args.cache_steps, args.cache_repeats)
    print("| cache | tables | threshold | branch forwards computed | wall s | wall speed-up | CPU s | CPU speed-up | "
          "PSNR vs uncached (dB) | error / model's contribution |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, tables, thr, forwards, wall, speed, cpu, cpu_speed, quality, share in rows:
        print(f"| {name} | {tables} | {thr} | {forwards} | {wall:.2f} | {speed:.2f}x | {cpu:.2f} | {cpu_speed:.2f}x | "
              f"{quality} | {share} |")
    print(f"\nUncached run of this model, per step (median over steps and branches): relative L1 change of e0 "
          f"{facts['e0']:.4f}, of the model output {facts['out']:.4f}; residual magnitude ratio "
          f"{facts['mag'][0]:.3f}-{facts['mag'][1]:.3f}. PSNR of the starting noise itself (no model run at all) "
          f"vs the uncached latent: {facts['floor']:.1f} dB. 'error / model's contribution' = "
          f"||latent - uncached|| / ||uncached - starting noise||.")


def run_cost_sections(args) -> None:
    dit = build_model(dim=512, layers=4, text_len=512)
    print(f"# Wan sampler benchmark — CPU, {args.threads} thread(s), torch {torch.__version__}, best CPU time of "
          f"{args.repeats}; DiT dim 512, 4 blocks, 4 heads of 128")

    print("\n## 1. Sampler overhead per step vs bare DiT forwards (128x128 px, 17 frames = 5x16x16 latent, "
          "320 tokens, 4 steps, UniPC)")
    print("| case | bare forward s/step | sampler s/step | overhead |")
    print("|---|---|---|---|")
    for name, base, mine, over in bench_sampler_overhead(dit, 128, 17, 4, args.repeats):
        print(f"| {name} | {base:.4f} | {mine:.4f} | {100 * over:+.2f}% |")

    print("\n## 2. Context windows (window 17 px frames = 5 latent, overlap 8 px = 2 latent, static_standard, "
          "64x64 px, 1 step, cfg 1)")
    print("| pixel frames | latent frames | windows | s/step | s/window | per-window vs first |")
    print("|---|---|---|---|---|---|")
    for row in bench_context(dit, 64, 17, [17, 33, 49, 65, 97], args.repeats):
        frames, lat, windows, per_step, per_window, rel = row
        print(f"| {frames} | {lat} | {windows} | {per_step:.4f} | {per_window:.4f} | {rel:.2f}x |")

    print("\n## 3. Block swap on CPU vs no swap (4 of 4 blocks swapped, prefetch 1, batch 2, 320 tokens)")
    print("| case | s/forward | overhead |")
    print("|---|---|---|")
    rows = bench_block_swap(dit, 128, 17, args.repeats)
    for name, per, over in rows:
        print(f"| {name} | {per:.4f} | {100 * over:+.2f}% |")
    per_block = bench_swap_bookkeeping(args.repeats)
    block_compute = rows[0][1] / len(dit.blocks)
    print(f"\nSchedule bookkeeping measured alone (hooks, slot bookkeeping, re-pointing a Wan block's "
          f"27 tensors to its slot and back; blocks that do no math): {per_block * 1e6:.0f} us per swapped block = "
          f"{100 * per_block / block_compute:.2f}% of one block's compute in the case above "
          f"({block_compute * 1e3:.1f} ms).")


if __name__ == "__main__":
    main()
