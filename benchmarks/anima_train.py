"""Anima context-token training: ms per training step and peak memory, tiny and mid-size configs.

Times are medians over the timed steps. Each config runs in a fresh subprocess (so peak memory is its own) with random weights of the real
architecture. A training step is what AnimaFastTrain does per step — one forward with the tokens
injected in every block, one backward to the tokens, one Adam update; the baseline in the same run
is one plain forward (no tokens, no autograd), i.e. what one sampler call costs, so the ratio is the
price of training over inference. Peak memory: CUDA max_memory_allocated, or on CPU the process's
peak RSS (sampled every millisecond) above its RSS just before training (the weights already loaded). Run it alone:

    python benchmarks/anima_train.py [--configs tiny,mid] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from dataclasses import replace

from _common import import_package, run_child

import_package()

import torch  # noqa: E402
from slipstream.kernels.precision import dtype_name, resolve_dtype  # noqa: E402
from slipstream.models.anima.dit import AnimaConfig, AnimaDiT  # noqa: E402
from slipstream.models.anima.tiny import TINY_DIT, randomize  # noqa: E402
from slipstream.models.anima.train import TrainSettings, train_context_tokens  # noqa: E402

# The adapter only runs once per prompt, so it is left out of the timed model.
CONFIGS = {
    "tiny": replace(TINY_DIT, adapter=None),
    "mid": AnimaConfig(model_channels=512, num_blocks=8, num_heads=8, adaln_lora_dim=128, adapter=None),
    "full": AnimaConfig(adapter=None),      # Anima 2B: a GPU measurement
}


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Highest RSS seen while active, sampled every millisecond on a side thread (CPU runs)."""

    def __enter__(self) -> RssPeak:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure(name: str, device: str, precision: str, size: int, steps: int, tokens: int) -> dict:
    dev = torch.device(device)
    dtype = resolve_dtype(precision, dev)
    cfg = CONFIGS[name]
    # Random weights can drive activations and gradients into subnormal floats, which the CPU
    # handles 10-20x slower than a trained model's values; flush them so the timing is the real work.
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    with torch.device(dev):
        dit = AnimaDiT(cfg)
    randomize(dit, 0, std=cfg.model_channels ** -0.5).to(dtype).eval().requires_grad_(False)
    latent = torch.randn(1, cfg.in_channels, 1, size // 8, size // 8, device=dev)
    context = torch.randn(1, 512, cfg.crossattn_emb_channels, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def forward() -> None:
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            dit(latent.to(dtype), torch.tensor([0.5], device=dev), context.to(dtype))

    forward_times: list[float] = []

    def time_forwards() -> None:
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            forward()
            sync()
            forward_times.append(time.perf_counter() - t0)

    forward()                                                                               # warm-up
    time_forwards()

    settings = TrainSettings(steps=1, learning_rate=5e-3, num_tokens=tokens, dtype=dtype, eval_draws=0)
    train_context_tokens(dit, [latent], context, settings, dev)                              # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_bytes()
    marks = []

    def mark(done: int, total: int, loss: float) -> None:
        sync()
        marks.append(time.perf_counter())

    sync()
    marks.append(time.perf_counter())
    with RssPeak() as rss:
        train_context_tokens(dit, [latent], context, replace(settings, steps=steps), dev, progress=mark)
    step_times = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    time_forwards()               # forwards before and after the training steps share their conditions
    # Medians: this machine is shared, and a median ignores the steps another process slowed down.
    forward_ms, step_ms = 1000 * statistics.median(forward_times), 1000 * statistics.median(step_times)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = rss.peak - base
    return {"config": name, "params_m": sum(p.numel() for p in dit.parameters()) / 1e6,
            "blocks": cfg.num_blocks, "width": cfg.model_channels, "image": size, "dit_tokens": (size // 16) ** 2,
            "forward_ms": forward_ms, "step_ms": step_ms, "peak_mb": max(peak, 0) / 2**20,
            "dtype": dtype_name(dtype), "device": str(dev), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,mid", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", help="auto = bf16 on recent GPUs, fp32 on CPU")
    ap.add_argument("--size", type=int, default=256, help="training image side in pixels")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--tokens", type=int, default=8, help="tokens per block")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device, args.precision, args.size, args.steps, args.tokens)))
        return
    rows = [run_child(__file__, "--child", name, "--device", args.device, "--precision", args.precision,
                      "--size", str(args.size), "--steps", str(args.steps), "--tokens", str(args.tokens))
            for name in args.configs.split(",")]
    print(f"Anima context-token training, {args.steps} timed steps, {args.tokens} tokens/block, "
          f"{rows[0]['device']} {rows[0]['dtype']}, {rows[0]['threads']} threads")
    print("| config | params | blocks × width | image (DiT tokens) | forward ms (baseline) | train step ms | "
          "step / forward | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['params_m']:.1f} M | {r['blocks']} × {r['width']} | {r['image']} px "
              f"({r['dit_tokens']}) | {r['forward_ms']:.1f} | {r['step_ms']:.1f} | "
              f"{r['step_ms'] / r['forward_ms']:.2f}× | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
