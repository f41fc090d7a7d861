"""Peak RAM of loading an int8 checkpoint, with the CPU int8 weights prepacked vs kept plain.

A prepacked layer must not hold its weight twice (oneDNN's packed layout beside the plain int8
tensor). This writes a 2-block (`--blocks`) Wan 2.1 1.3B DiT (real widths) as an int8 file in
ComfyUI's layout, then loads it in fresh child processes — once with the backend this machine
selects, once on plain `torch._int_mm` — and reports the rise of peak RSS (VmHWM) over the RSS
just before the load, against the file's int8 weight bytes and its total bytes. The state dict
stays referenced until the model is built, as inside ComfyUI, so weights packed only as their
layer loads would show up twice. oneDNN's one-time start-up in a process (its code pages and JIT
kernels, the same for any model) is measured in its own column, before that baseline.
Goal: peak rise <= 1.25x the int8 weight bytes (plus the file's float tensors).

    python benchmarks/int8_load_memory.py [--blocks 2]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile

from _common import MIB, import_package, print_table, run_child


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process (Linux). VmHWM, not ru_maxrss: ru_maxrss survives execve, so a
    child would report the peak of the parent that generated the file."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def _current_rss() -> int:
    return _status_bytes("VmRSS")


def write_file(path: str, blocks: int) -> dict:
    import torch
    from safetensors.torch import save_file

    import_package()
    dit = importlib.import_module("slipstream.models.wan.dit")
    wan_config = importlib.import_module("slipstream.models.wan.config")
    int8 = importlib.import_module("slipstream.kernels.int8")
    config = wan_config.WanDiTConfig(f"Wan2.1-1.3B, {blocks} blocks", "t2v", dim=1536, ffn_dim=8960, num_heads=12,
                                     num_layers=blocks)
    sd = dit.random_state_dict(config, seed=0, dtype=torch.bfloat16)
    out, int8_bytes, float_bytes = {}, 0, 0
    for key, value in sd.items():
        layer = key.removesuffix(".weight")
        if key.startswith("blocks.") and key.endswith(".weight") and value.dim() == 2:
            q, scale = int8.quantize_weight(value, per_row=True)
            out[key], out[f"{layer}.weight_scale"] = q, scale
            out[f"{layer}.comfy_quant"] = int8.encode_comfy_quant(int8.comfy_quant_config(0))
            int8_bytes += q.numel()
            float_bytes += scale.numel() * scale.element_size()
        else:
            out[key] = value.contiguous()
            float_bytes += value.numel() * value.element_size()
    save_file(out, path)
    return {"int8_bytes": int8_bytes, "float_bytes": float_bytes, "file_bytes": os.path.getsize(path)}


def measure(path: str, backend: str) -> None:
    import torch  # imported before the baseline is taken

    import_package()
    onednn = importlib.import_module("slipstream.kernels.int8_onednn")
    loading = importlib.import_module("slipstream.models.quant_loading")
    formats = importlib.import_module("slipstream.models.quant_formats")
    build = importlib.import_module("slipstream.models.quant_build")
    ql = importlib.import_module("slipstream.kernels.quant_layer")
    int8 = importlib.import_module("slipstream.kernels.int8")
    arch = build.standalone_architectures()["wan"]
    # oneDNN's first use in a process maps its code and JIT-compiles its kernels (~15 MiB, the same
    # for any model size): paid once, by the first int8 layer packed or run, so it is measured on
    # its own and left out of the load's rise.
    cold = _current_rss()
    with onednn.use_backend(backend):
        int8.cpu_packed(torch.ones(64, 64, dtype=torch.int8))
    before = _current_rss()
    with onednn.use_backend(backend):
        sd, _ = formats.normalize(loading.read_int8_file(path, torch.device("cpu")))
        held = dict(sd)   # as ComfyUI's loader does: every tensor stays referenced until the whole model is loaded
        model, _ = build.build_quantized(sd, arch, ql.QuantPlan())
    peak = _status_bytes("VmHWM")
    del held
    report = int8.int8_report(model)
    print(json.dumps({"rise": peak - before, "first_use": before - cold, "packed_layers": report["packed_layers"],
                      "int8_layers": report["int8_layers"], "after": _current_rss() - before}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("FILE", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=2,
                        help="transformer blocks in the file (the real model has 30; the embeddings and head, "
                             "kept float, weigh as much as ~1 block)")
    args = parser.parse_args(argv)
    if args.child:
        measure(*args.child)
        return
    import_package()
    onednn = importlib.import_module("slipstream.kernels.int8_onednn")
    print(f"{onednn.cpu_features_line()}; oneDNN kernel: {onednn.kernel_implementation()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"wan_{args.blocks}blocks_int8.safetensors")
        sizes = write_file(path, args.blocks)
        rows = []
        for backend in dict.fromkeys((onednn.backend(), onednn.BACKEND_INT_MM)):
            r = run_child(__file__, "--child", path, backend)
            rows.append([backend, f"{r['packed_layers']}/{r['int8_layers']}", r["first_use"] / MIB,
                         r["rise"] / MIB, r["after"] / MIB,
                         r["rise"] / sizes["int8_bytes"], (r["rise"] - sizes["float_bytes"]) / sizes["int8_bytes"],
                         r["rise"] / sizes["file_bytes"]])
    print(f"{args.blocks} blocks: int8 weights {sizes['int8_bytes'] / MIB:.1f} MiB, float tensors {sizes['float_bytes'] / MIB:.1f} MiB, "
          f"file {sizes['file_bytes'] / MIB:.1f} MiB")
    print_table(["backend", "packed layers", "oneDNN first use MiB (once)", "peak rise MiB", "held after MiB", "rise / int8 bytes",
                 "(rise - float bytes) / int8 bytes", "rise / file bytes"], rows,
                ["", ">", ".1f", ".1f", ".1f", ".2f", ".2f", ".2f"])
    print(f"int8_load_memory [{onednn.describe()}]: (peak rise - float tensor bytes) / int8 weight bytes "
          f"{rows[0][6]:.2f} (goal <= 1.25), peak rise / int8 weight bytes {rows[0][5]:.2f}, "
          f"/ file bytes {rows[0][7]:.2f}; oneDNN's first use in the process {rows[0][2]:.1f} MiB, once")


if __name__ == "__main__":
    sys.exit(main())
