"""W8A8 Linear vs fp32 and bf16 F.linear on the Wan-1.3B shapes (and 4096²), CPU.

Prints one row per (shape, M): ms for fp32 and bf16 F.linear and for the W8A8 layer fed fp32
activations (as ComfyUI runs on CPU; fp32 out) and bf16 activations (bf16 out), on the int8 CPU
backend this machine selects, plus the same layer on plain `torch._int_mm` (bf16 activations) for
reference. The first lines name the CPU features and the selected backend. Each speed-up
compares like with like — the int8 layer replacing the float layer of a model that runs in that
precision: vs fp32 = fp32 / W8A8(fp32 act), vs bf16 = bf16 / W8A8(bf16 act). Errors are relative
L2 against a float64 reference on Gaussian data (W8A8 plain) and on data with a few 30× input
channels (plain, and with ConvRot on).
"GEMM alone vs fp32" times only the prepacked kernel and its rescale, on activations quantized
beforehand: the bound the layer approaches, set by the CPU's int8 dot-product rate against its fp32
multiply-add rate (4× on AVX512-VNNI), which the quantization pass then eats into.
Goals: ≥ 3.5× fp32 and ≥ 1.7× bf16 at M ≥ 256; error ≤ 1.5 % Gaussian, ≤ 2 % outliers.

    python benchmarks/int8_linear.py [--rounds 15] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import importlib

import torch
import torch.nn.functional as F
from _common import import_package, interleaved_times, print_table, rel_error

SHAPES = [(1536, 1536, "Wan1.3B attn"), (1536, 8960, "Wan1.3B ffn.0"), (8960, 1536, "Wan1.3B ffn.2"),
          (4096, 4096, "4096x4096")]
ROWS = [1, 16, 256, 1024]


def outlier_input(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian activations with 0.5 % of the input channels scaled ×30, the outlier pattern real DiT activations show."""
    x = torch.randn(m, k, generator=gen)
    channels = torch.randperm(k, generator=gen)[: max(1, k // 200)]
    x[:, channels] *= 30.0
    return x


def build_cases(rows: list[int], int8, onednn) -> tuple[dict, list[dict]]:
    """Every (shape, M, variant) as a timed callable, plus the accuracy of each (shape, M)."""
    variants: dict[tuple, object] = {}
    cases = []
    for k, n, label in SHAPES:
        gen = torch.Generator().manual_seed(k * 7 + n)
        weight = torch.randn(n, k, generator=gen) / k ** 0.5
        bias = torch.randn(n, generator=gen) * 0.01
        linear = torch.nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        plain = int8.Int8Linear.from_float(linear)
        with onednn.use_backend(onednn.BACKEND_INT_MM):
            int_mm = int8.Int8Linear.from_float(linear)
        rotated = int8.Int8Linear.from_float(linear, rotation_group=256)
        w_bf16, b_bf16 = weight.bfloat16(), bias.bfloat16()
        for m in rows:
            x = torch.randn(m, k, generator=gen)
            x_bf16 = x.bfloat16()
            variants[(k, n, m, "fp32")] = functools.partial(F.linear, x, weight, bias)
            variants[(k, n, m, "bf16")] = functools.partial(F.linear, x_bf16, w_bf16, b_bf16)
            variants[(k, n, m, "w8a8")] = functools.partial(plain, x)
            variants[(k, n, m, "w8a8_bf16")] = functools.partial(plain, x_bf16)
            variants[(k, n, m, "int_mm_bf16")] = functools.partial(int_mm, x_bf16)
            with torch.inference_mode():
                if isinstance(plain.weight, onednn.PackedInt8Weight):   # the GEMM alone, activations quantized once
                    x8, act_scale = int8.quantize_activation(x, unsigned=True)
                    variants[(k, n, m, "gemm")] = functools.partial(onednn.linear, x8, act_scale, plain.weight,
                                                                    plain.weight_scale, plain.bias, torch.float32)
                ref = F.linear(x.double(), weight.double(), bias.double())
                xo = outlier_input(max(m, 256), k, gen)
                ref_o = F.linear(xo.double(), weight.double(), bias.double())
                cases.append({"k": k, "n": n, "m": m, "label": label, "err": rel_error(plain(x), ref),
                              "err_o_plain": rel_error(plain(xo), ref_o),
                              "err_o_rot": rel_error(rotated(xo), ref_o)})
    return variants, cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (min is reported)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, M in {16, 256} only (smoke run)")
    args = parser.parse_args(argv)
    import_package()
    int8 = importlib.import_module("slipstream.kernels.int8")
    onednn = importlib.import_module("slipstream.kernels.int8_onednn")
    rounds = 3 if args.quick else args.rounds
    rows = [16, 256] if args.quick else ROWS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; min over {rounds} interleaved "
          "rounds (median in brackets)")
    print(f"{onednn.cpu_features_line()}; oneDNN kernel: {onednn.kernel_implementation()}")
    variants, cases = build_cases(rows, int8, onednn)
    with torch.inference_mode():
        times = interleaved_times(variants, rounds)
    table, speed_fp32, speed_bf16, errors, outlier_errors = [], [], [], [], []
    for r in cases:
        k, n, m = r["k"], r["n"], r["m"]
        (f32, f32_med), (b16, b16_med), (q8, q8_med), (qb, qb_med), (qi, _) = (
            times[(k, n, m, v)] for v in ("fp32", "bf16", "w8a8", "w8a8_bf16", "int_mm_bf16"))
        gemm = times.get((k, n, m, "gemm"), (None,))[0]
        vs32, vs16 = f32 / q8, b16 / qb
        if m >= 256:
            speed_fp32.append(vs32)
            speed_bf16.append(vs16)
        errors.append(r["err"])
        outlier_errors.append(r["err_o_rot"])
        table.append([f"{k}->{n} ({r['label']})", m, f"{f32:.3f} [{f32_med:.3f}]", f"{b16:.3f} [{b16_med:.3f}]",
                      f"{q8:.3f} [{q8_med:.3f}]", f"{qb:.3f} [{qb_med:.3f}]", f"{qi:.3f}", f"{vs32:.2f}x",
                      f"{vs16:.2f}x", f"{b16 / qi:.2f}x", "-" if gemm is None else f"{f32 / gemm:.2f}x",
                      r["err"], r["err_o_plain"], r["err_o_rot"]])
    print_table(["shape", "M", "fp32 ms", "bf16 ms", "W8A8 fp32-act ms", "W8A8 bf16-act ms", "_int_mm bf16-act ms",
                 "vs fp32", "vs bf16", "_int_mm vs bf16", "GEMM alone vs fp32", "err gauss", "err outl.",
                 "err outl.+rot"], table,
                ["", "d", ">", ">", ">", ">", ">", ">", ">", ">", ">", ".4f", ".4f", ".4f"])
    print(f"outlier channels (x30 on 0.5%), ConvRot on: max rel error {max(outlier_errors):.4f} (goal <= 0.02)")
    print(f"int8_linear [{onednn.describe()}]: min speedup vs fp32 {min(speed_fp32):.2f}, "
          f"vs bf16 {min(speed_bf16):.2f} (M>=256); "
          f"max rel error {max(errors):.4f}")


if __name__ == "__main__":
    main()
