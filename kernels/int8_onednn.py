"""The CPU int8 GEMM with a weight packed once: oneDNN's `qlinear_prepack` / `qlinear_pointwise`.

Why: `torch._int_mm` hands oneDNN a plain int8 weight, which oneDNN reorders into its blocked
(AMX tile / VNNI) layout on *every call*. On an AMX machine that reorder made W8A8 slower than
bf16, which goes to the AMX tiles directly. Packing the weight once at load and calling the
prepacked kernel removes the reorder; AMX-INT8 has twice AMX-BF16's peak.

Activations go in as uint8 q + 128 with a zero point of 128, never as int8. `qlinear_prepack`
packs the weight for u8 activations (the packing carries oneDNN's zero-point compensation, ΣW per
column), and with int8 activations oneDNN finds no optimised kernel for that packing: it ran its
reference matmul, ~1000× slower than bf16 on an AVX512-VNNI machine. u8 + zero point is the
combination the x86 kernels (VNNI brgemm, AMX) are built for, and it is exact: the kernel forms
Σ(q+128)·w − 128·Σw = Σq·w in int32. The quantizer writes the offset form in the same pass.

Exact per-row activation scales: the kernel takes one activation scale per call. Activations are
quantized per row as everywhere else, the kernel runs with a unit activation scale and the
weight scales (so it returns `acc · w_scale` in fp32, the same product the `_int_mm` path forms),
and the row scales and bias are applied after it: in place on the kernel's block for an fp32
output (that block is the output), in row chunks whose fp32 block stays in cache for bf16/fp16.

When it is used — by CPU features, read at run time, never by vendor: AMX (`amx_int8`) or an
int8 dot-product instruction (AVX512-VNNI / AVX-VNNI). Without one, oneDNN's u8×s8 multiply
(`vpmaddubsw`) saturates int16 pairs and the result would not be exact, so those machines keep
`torch._int_mm`. SLIPSTREAM_INT8_CPU_BACKEND=int_mm forces the old path (comparisons, bugs).

Memory: a packed layer holds only the packed weight. Its `weight` stays a real [N, K] int8
Parameter to ComfyUI and to state dicts — a `PackedInt8Weight` tensor that rebuilds the plain
weight for whatever reads it (saving, LoRA patching, moving to a GPU), one layer at a time, and
re-packs after an in-place write. So loading never holds a second copy of the int8 weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

import torch
from torch.utils._pytree import tree_map

log = logging.getLogger("slipstream.int8")

BACKEND_PREPACKED = "onednn-prepacked"
BACKEND_INT_MM = "torch._int_mm"
# Rows per kernel call for a bf16/fp16 output: the fp32 block is rescaled and rounded while it is
# still in cache and never exists in full, and 256 rows keep the AMX tiles busy (64-row calls lost
# more to per-call overhead than the cache saved).
_ROWS_PER_CALL = 256
_lock = threading.Lock()
_state: dict[str, object] = {}            # "backend", "why", "features", "refused" (reported once)


def _flag(name: str) -> bool:
    fn = getattr(torch.cpu, name, None) or getattr(torch._C._cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:
        return False


def cpu_features() -> dict[str, bool]:
    """The int8-relevant CPU features torch sees (AMX tiles, VNNI, AVX512, AVX2, AMX/AVX512 bf16)."""
    if "features" not in _state:
        _state["features"] = {"amx": _flag("_is_amx_tile_supported"), "vnni": _flag("_is_vnni_supported"),
                              "avx512": _flag("_is_avx512_supported"), "avx2": _flag("_is_avx2_supported"),
                              "avx512_bf16": _flag("_is_avx512_bf16_supported")}
    return dict(_state["features"])  # type: ignore[arg-type]


def cpu_features_line() -> str:
    """One line for benchmarks and notes: the CPU features and the int8 backend they select."""
    feats = cpu_features()
    names = ", ".join(k for k, v in feats.items() if v) or "none of amx/vnni/avx512/avx2"
    return f"CPU features: {names}; int8 CPU backend: {describe()}"


def _ops_present() -> bool:
    onednn = getattr(torch.ops, "onednn", None)
    try:
        return onednn is not None and hasattr(onednn, "qlinear_prepack") and hasattr(onednn, "qlinear_pointwise") \
            and torch.backends.mkldnn.is_available()
    except Exception:
        return False


def backend() -> str:
    """BACKEND_PREPACKED or BACKEND_INT_MM for this machine (decided once per process)."""
    if "backend" in _state:
        return _state["backend"]  # type: ignore[return-value]
    with _lock:
        if "backend" not in _state:
            name, why = _choose()
            _state["backend"], _state["why"] = name, why
    return _state["backend"]  # type: ignore[return-value]


def _choose() -> tuple[str, str]:
    forced = os.environ.get("SLIPSTREAM_INT8_CPU_BACKEND", "").strip().lower()
    if forced in ("int_mm", "_int_mm", "torch._int_mm"):
        return BACKEND_INT_MM, "forced by SLIPSTREAM_INT8_CPU_BACKEND"
    if not _ops_present():
        return BACKEND_INT_MM, "this torch build has no oneDNN qlinear ops"
    feats = cpu_features()
    if feats["amx"]:
        return BACKEND_PREPACKED, "AMX"
    if feats["vnni"]:
        return BACKEND_PREPACKED, "VNNI"
    return BACKEND_INT_MM, "no AMX or VNNI: oneDNN's u8*s8 path could saturate"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Layers built inside use `name` (BACKEND_PREPACKED needs the ops): for benchmarks comparing the
    two paths in one run, and tests. Packing happens when a layer takes its weight, so a layer
    keeps the backend it was built with."""
    if name not in (BACKEND_PREPACKED, BACKEND_INT_MM):
        raise ValueError(f"unknown int8 CPU backend {name!r}")
    if name == BACKEND_PREPACKED and not _ops_present():
        raise RuntimeError("this torch build has no oneDNN qlinear ops")
    backend()
    saved = _state["backend"], _state["why"]
    _state["backend"], _state["why"] = name, "chosen by the caller"
    try:
        yield
    finally:
        _state["backend"], _state["why"] = saved


def describe() -> str:
    """E.g. "onednn-prepacked (AMX)" or "torch._int_mm (no AMX or VNNI: …)", for notes and tables."""
    name = backend()
    return f"{name} ({_state['why']})"


def _report_refusal(what: str, exc: Exception) -> None:
    """Log the first refusal of the process (later ones are only counted by the layers)."""
    if "refused" in _state:
        return
    _state["refused"] = f"{what}: {exc}"
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    log.warning("int8: oneDNN's prepacked kernel refused %s (%s); such layers use torch._int_mm, which "
                "is slower on this CPU. Counted per layer in the loader's report.", what, first)


def refusal() -> str | None:
    """The first refusal of this process ("what: error"), or None."""
    return _state.get("refused")  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- packed weight


class _Box:
    """The packed weight and what the kernel needs beside it; shared by every alias of one weight."""

    __slots__ = ("packed", "zero_points")

    def __init__(self, packed: torch.Tensor, n: int):
        self.packed = packed
        self.zero_points = torch.zeros(n, dtype=torch.int64)


def _pack_raw(dense: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(dense.contiguous(), None)


class PackedInt8Weight(torch.Tensor):
    """An int8 [N, K] weight held only in oneDNN's packed layout.

    To everything but the int8 kernel it is an ordinary int8 tensor: any op on it runs on the plain
    weight, rebuilt for that op (`to_dense` of the packed layout, ~1 ms per 10 M weights) and freed
    after; an in-place write (`copy_`, ComfyUI's in-place LoRA update) re-packs. Detaching or
    wrapping it in a Parameter shares the packed data. Strides are those of the transposed layout,
    so `.contiguous()` returns the plain weight (what safetensors needs).
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, box: _Box, shape: tuple[int, int]):
        n, _k = shape
        return torch.Tensor._make_wrapper_subclass(cls, shape, strides=(1, n), dtype=torch.int8,
                                                   device=torch.device("cpu"), requires_grad=False)

    def __init__(self, box: _Box, shape: tuple[int, int]):
        self._box = box

    @property
    def packed(self) -> torch.Tensor:
        return self._box.packed

    @property
    def zero_points(self) -> torch.Tensor:
        return self._box.zero_points

    def dense(self) -> torch.Tensor:
        """The plain contiguous int8 [N, K] weight (a new tensor)."""
        return self._box.packed.to_dense().t().contiguous()

    def repack(self, dense: torch.Tensor) -> None:
        self._box.packed = _pack_raw(dense)

    def __repr__(self) -> str:
        return f"PackedInt8Weight(shape={tuple(self.shape)}, oneDNN layout)"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            src = args[0]
            return PackedInt8Weight(src._box, tuple(src.shape))
        dense_of: dict[int, tuple[PackedInt8Weight, torch.Tensor]] = {}

        def unwrap(t):
            if isinstance(t, PackedInt8Weight):
                if id(t) not in dense_of:
                    dense_of[id(t)] = (t, t.dense())
                return dense_of[id(t)][1]
            return t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        for index, arg in enumerate(func._schema.arguments):   # in-place / out= writes: re-pack
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = kwargs[arg.name] if arg.name in kwargs else (args[index] if index < len(args) else None)
            if isinstance(value, PackedInt8Weight):
                value.repack(dense_of[id(value)][1])
                return value
        return out


def pack(dense: torch.Tensor, what: str = "a layer") -> PackedInt8Weight | None:
    """The packed form of a CPU int8 [N, K] weight, or None where this machine keeps `_int_mm`
    (or oneDNN refuses the shape: reported once, counted by the caller)."""
    if isinstance(dense, PackedInt8Weight):
        return dense
    if dense.device.type != "cpu" or dense.dtype != torch.int8 or dense.dim() != 2 or backend() != BACKEND_PREPACKED:
        return None
    n, k = dense.shape
    try:
        raw = _pack_raw(dense)
    except Exception as exc:  # an odd shape this oneDNN build rejects: the old path is always correct
        _report_refusal(f"{what} of shape {n}x{k}", exc)
        return None
    return PackedInt8Weight(_Box(raw, n), (n, k))


_ZERO_POINT = 128     # the activation offset: uint8 q + 128 holds int8 q


def to_unsigned_(x8: torch.Tensor) -> torch.Tensor:
    """int8 q as uint8 q + 128, in place (flipping the sign bit is exactly + 128 mod 256)."""
    return x8.view(torch.uint8).bitwise_xor_(_ZERO_POINT)


def _weight_scales(weight_scale: torch.Tensor, n: int) -> torch.Tensor:
    scale = weight_scale.reshape(-1).float()
    return scale.expand(n).contiguous() if scale.numel() == 1 else scale


def _pointwise(xu8: torch.Tensor, packed: PackedInt8Weight, w_scales: torch.Tensor) -> torch.Tensor:
    """fp32 (xu8 − 128) · Wᵀ · w_scales from oneDNN's packed kernel (unit activation scale, no bias)."""
    return torch.ops.onednn.qlinear_pointwise(xu8, 1.0, _ZERO_POINT, packed.packed, w_scales, packed.zero_points,
                                              None, 1.0, 0, torch.float32, "none", [], "")


def linear(x8: torch.Tensor, act_scale: torch.Tensor, weight: PackedInt8Weight, weight_scale: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor | None:
    """[M, N] in `out_dtype` = (x8 · Wᵀ) · weight_scale · act_scale + bias, or None if oneDNN refuses.

    `x8` [M, K] and `act_scale` fp32 [M, 1] come from the per-row quantizer: uint8 q + 128 (its
    `unsigned` form, what the kernel takes) or int8 q (converted here, into a new tensor). The products
    are formed in the same order and precision as the `_int_mm` path's epilogue (acc · w_scale,
    then · act_scale + bias in fp32), so both paths give the same output.
    """
    if x8.dtype == torch.int8:
        x8 = to_unsigned_(x8.clone())
    m = x8.shape[0]
    n = weight.shape[0]
    w_scales = _weight_scales(weight_scale, n)
    b = None if bias is None else bias.to(torch.float32)
    try:
        if out_dtype == torch.float32:
            # One call, rescaled in place: the kernel's fp32 block is the output, so no second
            # buffer is written (chunked calls into a separate output measured 5-25 % slower on an
            # AVX512-VNNI CPU).
            y = _pointwise(x8, weight, w_scales)
            return y.mul_(act_scale) if b is None else torch.addcmul(b, y, act_scale, out=y)
        out = torch.empty(m, n, dtype=out_dtype)
        step = m if m <= _ROWS_PER_CALL * 5 // 4 else _ROWS_PER_CALL
        for i in range(0, m, step):
            y = _pointwise(x8[i:i + step], weight, w_scales)
            # Rescaled in place while the fp32 block is in cache, rounded to the output once: ~25 %
            # faster than addcmul writing bf16 directly; the values are the same.
            y.mul_(act_scale[i:i + step]) if b is None else torch.addcmul(b, y, act_scale[i:i + step], out=y)
            out[i:i + step].copy_(y)
    except Exception as exc:
        _report_refusal(f"an input of {m} rows for a {n}x{x8.shape[1]} layer", exc)
        return None
    return out


def kernel_implementation(k: int = 256, n: int = 256, m: int = 64) -> str:
    """The name oneDNN gives the implementation that runs the prepacked kernel here, e.g.
    "brg_matmul:avx512_core_vnni" or "brg_matmul:avx512_core_amx"; one starting "ref" is its
    unoptimised reference code (the slow path this module's uint8 activations avoid).

    A diagnostic for benchmarks and tests, not for the hot path: it runs one small call with
    oneDNN's verbose log on and reads that log from the process's stdout file descriptor.
    """
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack(w8, "the probe")
    if packed is None:
        return "none (this machine runs torch._int_mm)"
    xu8 = to_unsigned_(torch.zeros(m, k, dtype=torch.int8))
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as log_file:
        try:
            os.dup2(log_file.fileno(), 1)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                _pointwise(xu8, packed, torch.ones(n))
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log_file.seek(0)
        text = log_file.read().decode("utf-8", "replace")
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 6 and fields[2] == "primitive" and fields[3] == "exec" and fields[5] == "matmul":
            return fields[6]
    return "unknown (oneDNN's verbose log was empty)"
