"""GGUF dequant + matmul per quant type: our torch decoders vs the `gguf` package's numpy reference, CPU.

For each tensor type a Wan-sized weight (1536 -> 1536 attention, 1536 -> 8960 FFN) is filled with
random blocks (finite fp16 scales, every code pattern). Per (type, shape) it times, interleaved in
the same run:
  ours       GGUFLinear.forward: torch dequantize to the activation dtype, then F.linear
  reference  gguf.quants.dequantize (numpy) -> torch -> F.linear: what a loader without its own
             decoders does per layer call
and the float F.linear alone (the floor any per-call dequant adds to). "speed-up" = reference /
ours; "dequant x" compares the dequantization step alone. The output difference of the two paths
is printed too (it should be float rounding only).

    python benchmarks/gguf_dequant.py [--rounds 5] [--tokens 256] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import platform

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from _common import import_package, interleaved_times, print_table, rel_error

SHAPES = [(1536, 1536, "attn"), (1536, 8960, "ffn.0")]
TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_0", "Q4_0", "F16", "BF16"]
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "neon", "asimd", "sve")


def cpu_features() -> str:
    """The CPU model, torch's chosen kernel level and the SIMD flags that decide these timings."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    present = [flag for flag in CPU_FLAGS if flag in flags]
    return f"CPU: {model}; torch kernels: {capability}; flags: {' '.join(present) or '(unknown)'}"


def weight_bytes(gd, qtype, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [n, row bytes] holding an n x k weight of `qtype`."""
    if qtype.decode is None:
        values = (torch.randn(n, k, generator=generator) / k ** 0.5).to(qtype.float_dtype)
        return values.view(torch.uint8).reshape(n, -1)
    return gd.random_blocks(qtype, n * k // qtype.block_size, generator).reshape(n, -1)


def reference_forward(packed: np.ndarray, ggml_type, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    weight = torch.from_numpy(gguf.quants.dequantize(packed, ggml_type))
    return F.linear(x, weight.to(x.dtype), bias)


def build_cases(gd, gl, types: list[str], tokens: int) -> tuple[dict, list[dict]]:
    variants: dict[tuple, object] = {}
    cases = []
    for k, n, label in SHAPES:
        gen = torch.Generator().manual_seed(k + n)
        x = torch.randn(tokens, k, generator=gen)
        bias = torch.randn(n, generator=gen) * 0.01
        dense = torch.randn(n, k, generator=gen) / k ** 0.5
        variants[(label, "float")] = functools.partial(F.linear, x, dense, bias)
        for name in types:
            qtype = gd.QUANT_BY_NAME[name]
            ggml_type = gguf.GGMLQuantizationType[name]
            packed = weight_bytes(gd, qtype, n, k, gen)
            packed_np = packed.numpy()
            if qtype.decode is None:
                layer = torch.nn.Linear(k, n)
                layer.weight.data = packed.view(qtype.float_dtype).reshape(n, k)
                layer.bias.data = bias

                def ours(x=x, layer=layer):
                    return F.linear(x, layer.weight.to(x.dtype), layer.bias)

                def ours_dequant(packed=packed, qtype=qtype, n=n, k=k):
                    return gd.dequantize(packed, qtype, (n, k), torch.float32)
            else:
                layer = gl.GGUFLinear(k, n, qtype)
                layer.weight.data = packed
                layer.bias.data = bias
                ours = functools.partial(layer, x)
                ours_dequant = functools.partial(layer.dequantize, torch.float32)
            variants[(label, name, "ours")] = ours
            variants[(label, name, "reference")] = functools.partial(reference_forward, packed_np, ggml_type, x, bias)
            variants[(label, name, "ours_dequant")] = ours_dequant
            variants[(label, name, "reference_dequant")] = functools.partial(gguf.quants.dequantize, packed_np,
                                                                             ggml_type)
            with torch.inference_mode():
                diff = rel_error(ours(), reference_forward(packed_np, ggml_type, x, bias))
            cases.append({"label": f"{k}->{n} ({label})", "shape": label, "type": name, "diff": diff,
                          "bits": 8 * qtype.type_size / qtype.block_size})
    return variants, cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (min is reported)")
    parser.add_argument("--tokens", type=int, default=256, help="activation rows per matmul")
    parser.add_argument("--quick", action="store_true", help="2 rounds, Q8_0 / Q4_K / F16 only (smoke run)")
    args = parser.parse_args(argv)
    import_package()
    gd = importlib.import_module("slipstream.kernels.gguf_dequant")
    gl = importlib.import_module("slipstream.kernels.gguf_linear")
    rounds = 2 if args.quick else args.rounds
    types = ["Q8_0", "Q4_K", "F16"] if args.quick else TYPES
    print(cpu_features())
    print(f"torch {torch.__version__}, gguf {importlib.metadata.version('gguf')}, numpy {np.__version__}, "
          f"{torch.get_num_threads()} threads; M={args.tokens} fp32 activations; min over {rounds} interleaved "
          "rounds (median in brackets)")
    variants, cases = build_cases(gd, gl, types, args.tokens)
    with torch.inference_mode():
        times = interleaved_times(variants, rounds)
    table, speedups = [], []
    for case in cases:
        key = (case["shape"], case["type"])
        (o, o_med), (r, r_med) = times[(*key, "ours")], times[(*key, "reference")]
        (od, _), (rd, _) = times[(*key, "ours_dequant")], times[(*key, "reference_dequant")]
        floor, _ = times[(case["shape"], "float")]
        speedups.append(r / o)
        table.append([case["label"], case["type"], case["bits"], f"{o:.2f} [{o_med:.2f}]", f"{r:.2f} [{r_med:.2f}]",
                      f"{r / o:.2f}x", f"{od:.2f}", f"{rd:.2f}", f"{rd / od:.2f}x", f"{floor:.2f}", case["diff"]])
    print_table(["shape", "type", "bits/w", "ours ms", "reference ms", "speed-up", "ours deq ms", "ref deq ms",
                 "dequant x", "float matmul ms", "out diff"], table,
                ["", "", ".2f", ">", ">", ">", ">", ">", ">", ">", ".1e"])
    print(f"gguf_dequant: dequant+matmul speed-up over the numpy reference: min {min(speedups):.2f}x, "
          f"max {max(speedups):.2f}x; max output difference {max(c['diff'] for c in cases):.1e}")


if __name__ == "__main__":
    main()
