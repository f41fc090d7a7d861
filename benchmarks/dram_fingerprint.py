"""The weights key of Offload CLIP vs hashing every byte, on a CLIP-L-sized and a larger state dict, CPU.

Offload CLIP names a CLIP that no Slipstream loader registered by a fingerprint of its weights
(kernels/dram_fingerprint.py: names, shapes, dtypes, 8 sampled values per tensor). It runs on every
first offload of a freshly loaded module, so it must stay far below the cost of the load itself. Per
model, timed interleaved in the same run:
  fingerprint  weights_fingerprint(state_dict)
  full sha256  hashlib.sha256 over every tensor's bytes: what a content hash of the whole model costs
"speed-up" = full sha256 / fingerprint.

    python benchmarks/dram_fingerprint.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import platform

import torch
from _common import import_package, interleaved_times, print_table


def clip_l_like(width: int = 768, layers: int = 12, vocab: int = 49408) -> dict[str, torch.Tensor]:
    """CLIP-L text model shapes (196 tensors, 123 M parameters), fp16."""
    sd = {"embed.weight": torch.randn(vocab, width).half(), "pos.weight": torch.randn(77, width).half()}
    for i in range(layers):
        for name, shape in (("q", (width, width)), ("k", (width, width)), ("v", (width, width)),
                            ("o", (width, width)), ("fc1", (4 * width, width)), ("fc2", (width, 4 * width))):
            sd[f"layers.{i}.{name}.weight"] = torch.randn(shape).half()
            sd[f"layers.{i}.{name}.bias"] = torch.randn(shape[0]).half()
        for norm in ("ln1", "ln2"):
            sd[f"layers.{i}.{norm}.weight"] = torch.ones(width).half()
            sd[f"layers.{i}.{norm}.bias"] = torch.zeros(width).half()
    return sd


def full_hash(sd: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(sd):
        digest.update(sd[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="CLIP-L only, 2 rounds")
    args = parser.parse_args()
    import_package()
    fp = importlib.import_module("slipstream.kernels.dram_fingerprint")
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"kernel level {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    models = {"CLIP-L (123 M, fp16)": clip_l_like()}
    if not args.quick:
        models["24 layers, width 1024 (fp16)"] = clip_l_like(width=1024, layers=24, vocab=32128)
    rows = []
    for label, sd in models.items():
        times = interleaved_times({"fp": lambda sd=sd: fp.weights_fingerprint(sd.items()),
                                   "full": lambda sd=sd: full_hash(sd)}, rounds=2 if args.quick else args.rounds)
        size = sum(t.numel() * t.element_size() for t in sd.values()) / 2**20
        rows.append((label, len(sd), size, times["fp"][0], times["full"][0], times["full"][0] / times["fp"][0]))
    print_table(["model", "tensors", "MiB", "fingerprint ms", "full sha256 ms", "speed-up"], rows,
                ["", "d", ".0f", ".2f", ".1f", ".0f"])


if __name__ == "__main__":
    main()
