"""A 2-block Wan 2.1 1.3B DiT (real widths: dim 1536, FFN 8960, 12 heads) in fp32, bf16 and W8A8 on CPU.

The int8 model is the bf16 model with its Linear layers converted exactly as the loader does
(`model_type` wan: embedders, time projection and head stay float), so it runs with bf16
activations like the model it replaces; a second int8 model does the same from fp32. Timed: the
two transformer blocks (`forward_blocks`, what int8 accelerates) and the whole forward. Weight
bytes: every parameter of the two blocks. Error: relative L2 of the block output (the fp32 residual
stream) against the fp32 model. Latent 1×16×4×32×32 (1024 tokens), 512 text tokens.

    python benchmarks/int8_model.py [--rounds 5] [--profile]

--profile adds where the block time goes (torch.profiler, per op family), for bf16 and int8.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib

import torch
from _common import import_package, interleaved_times, print_table, rel_error


def block_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.blocks.parameters(), *model.blocks.buffers()])


FAMILIES = (("int8 GEMM", ("aten::_int_mm", "onednn::qlinear_pointwise")), ("float GEMM", ("aten::addmm", "aten::mm", "aten::bmm")),
            ("attention", ("aten::_scaled_dot_product",)), ("int8 quantize (compiled)", ("Torch-Compiled", "## Call")))


def profile_blocks(models, x, timestep, context) -> None:
    """Self CPU time of one block pass per op family: what int8 speeds up and what it cannot."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name, model in models.items():
        with torch.inference_mode():
            tokens, inputs = model.embed(x, timestep, context)
            model.forward_blocks(tokens, inputs)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.forward_blocks(tokens, inputs)
        totals = {family: 0.0 for family, _ in FAMILIES}
        other = 0.0
        for event in prof.key_averages():
            family = next((f for f, keys in FAMILIES if event.key.startswith(keys)), None)
            if family is None:
                other += event.self_cpu_time_total
            else:
                totals[family] += event.self_cpu_time_total
        whole = sum(totals.values()) + other
        rows.append([name] + [f"{t / 1e3:.0f} ({t / whole:.0%})" for t in (*totals.values(), other)]
                    + [f"{whole / 1e3:.0f}"])
    headers = ["profile (ms, 2 blocks)", *(f for f, _ in FAMILIES), "norms, GELU, RoPE, casts, rest", "total"]
    print_table(headers, rows, ["", *(">" for _ in headers[1:])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (min is reported)")
    parser.add_argument("--profile", action="store_true", help="print the block time per op family")
    args = parser.parse_args(argv)
    import_package()
    wan_config = importlib.import_module("slipstream.models.wan.config")
    dit = importlib.import_module("slipstream.models.wan.dit")
    ql = importlib.import_module("slipstream.kernels.quant_layer")
    presets = importlib.import_module("slipstream.models.quant_presets")
    onednn = importlib.import_module("slipstream.kernels.int8_onednn")

    config = wan_config.WanDiTConfig("Wan2.1-1.3B, 2 blocks", "t2v", dim=1536, ffn_dim=8960, num_heads=12,
                                     num_layers=2)
    sd = dit.random_state_dict(config, seed=0)
    models = {"fp32": dit.WanDiT.from_state_dict(sd, dtype=torch.float32),
              "bf16": dit.WanDiT.from_state_dict(sd, dtype=torch.bfloat16)}
    rules = presets.BY_NAME["wan"].rules()
    selected = onednn.backend()
    for name, base, rotation, backend in (("int8", "bf16", False, selected), ("int8+ConvRot", "bf16", True, selected),
                                          ("int8 (fp32 act)", "fp32", False, selected),
                                          ("int8 on _int_mm", "bf16", False, onednn.BACKEND_INT_MM)):
        if name == "int8 on _int_mm" and selected == onednn.BACKEND_INT_MM:
            continue
        model = copy.deepcopy(models[base])
        with onednn.use_backend(backend):
            ql.convert_linears(model, ql.QuantPlan(on_the_fly=True, rotation=rotation, exclude=rules))
        models[name] = model
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 4, 32, 32, generator=gen)
    timestep = torch.tensor([700.0])
    context = torch.randn(1, 512, config.text_dim, generator=gen)

    variants, block_out = {}, {}
    with torch.inference_mode():
        for name, model in models.items():
            tokens, inputs = model.embed(x, timestep, context)
            block_out[name] = model.forward_blocks(tokens, inputs)
            variants[(name, "blocks")] = functools.partial(model.forward_blocks, tokens, inputs)
            variants[(name, "forward")] = functools.partial(model, x, timestep, context)
        times = interleaved_times(variants, args.rounds, min_block_s=0.0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {config.name}; "
          f"1024 tokens, 512 text tokens; min over {args.rounds} interleaved rounds (median in brackets)")
    print(f"{onednn.cpu_features_line()}; oneDNN kernel: {onednn.kernel_implementation()}")
    ref_bytes = block_bytes(models["bf16"])
    rows = []
    for name, model in models.items():
        (tb, tb_med), (tf, tf_med) = times[(name, "blocks")], times[(name, "forward")]
        baseline = "fp32" if name in ("fp32", "int8 (fp32 act)") else "bf16"
        rows.append([name, f"{tb:.0f} [{tb_med:.0f}]", f"{times[(baseline, 'blocks')][0] / tb:.2f}x vs {baseline}",
                     f"{tf:.0f} [{tf_med:.0f}]", block_bytes(model) / 2**20, block_bytes(model) / ref_bytes,
                     rel_error(block_out[name], block_out["fp32"])])
    print_table(["model", "2 blocks ms", "speed-up", "whole forward ms", "block MiB", "bytes vs bf16",
                 "rel error vs fp32"], rows, ["", ">", ">", ">", ".1f", ".3f", ".4f"])
    if args.profile:
        profile_blocks({name: models[name] for name in ("bf16", "int8")}, x, timestep, context)
    speed = times[("bf16", "blocks")][0] / times[("int8", "blocks")][0]
    ratio = block_bytes(models["int8"]) / ref_bytes
    err = rel_error(block_out["int8"], block_out["fp32"])
    rot = times[("bf16", "blocks")][0] / times[("int8+ConvRot", "blocks")][0]
    print(f"int8_model [{onednn.describe()}]: speedup vs bf16 {speed:.2f} (ConvRot {rot:.2f}), weight bytes vs bf16 {ratio:.2f}, rel error {err:.4f}")


if __name__ == "__main__":
    main()
