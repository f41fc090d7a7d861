"""The int8 × int8 → int32 GEMM behind every Int8Linear, and the shape rules of each device.

`torch._int_mm` runs on CPU (oneDNN, VNNI) and CUDA (cuBLASLt). On CPU it takes any shape. On
CUDA it refuses M ≤ 16 and K or N that are not multiples of 8; the public INT8 packs answered
that by dequantizing the whole weight and running a float matmul — 11–260× slower than int8 at
M = 1 on CPU, and a silent change of numerics. Here such shapes are zero-padded instead: padding
rows or reduction channels with zeros changes no output value. Devices without an int8 GEMM
(MPS, XPU, DirectML) get `None` rules and the caller runs its counted float fallback.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import int8_fused


@dataclass(frozen=True)
class GemmRules:
    """What `torch._int_mm` accepts on a device: M > min_rows_exclusive, K and N multiples."""

    min_rows_exclusive: int = 0
    k_multiple: int = 1
    n_multiple: int = 1

    def padded_rows(self, m: int) -> int:
        return max(m, self.min_rows_exclusive + 1) if self.min_rows_exclusive else m

    def padded_k(self, k: int) -> int:
        return -(-k // self.k_multiple) * self.k_multiple

    def padded_n(self, n: int) -> int:
        return -(-n // self.n_multiple) * self.n_multiple


CPU_RULES = GemmRules()
# Columns of the int32 accumulator computed per GEMM call on CPU, sized so the block (M × cols × 4
# bytes) is rescaled while it is still in cache: rescaling a 36 MB accumulator from DRAM in two
# passes cost as much as the GEMM itself (Wan ffn.0 at M = 1024).
_EPILOGUE_BLOCK_BYTES = 12 * 1024 * 1024
# Weight-left GEMMs pay a transposed epilogue (∝ M·N) to save the per-call weight reorder (∝ N·K).
_SWAP_MAX_ROWS_PER_K = 0.125
# cuBLASLt int8: "self.size(0) needs to be greater than 16"; K and N multiples of 8. Rows are
# padded to 32 (not 17) because cuBLASLt picks far better int8 kernels for M % 8 == 0.
CUDA_RULES = GemmRules(min_rows_exclusive=31, k_multiple=8, n_multiple=8)


class _Workspace(threading.local):
    """Per-thread CPU scratch memory reused by successive int8 layer calls.

    A fresh multi-megabyte buffer is page-faulted in on every call on Linux (glibc maps large
    allocations), which cost a large share of a layer's time at M = 256-1024. Temporaries that
    never leave one call (int8 activations, their scales, the fp32 quantization chunk, the int32
    accumulator block) come from here instead; buffers above `_MAX_CACHED` are not kept.
    """

    _MAX_CACHED = 32 * 1024 * 1024

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            if numel * buf.element_size() <= self._MAX_CACHED:
                self.buffers[name] = buf
        return buf[:numel].view(shape)


_WORKSPACE = _Workspace()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A temporary that must not outlive the current layer call (reused memory on CPU)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return _WORKSPACE.take(name, shape, dtype)


def rules_for(device: torch.device) -> GemmRules | None:
    """The int8 GEMM shape rules of a device, or None where torch has no int8 GEMM."""
    if device.type == "cpu":
        return CPU_RULES
    if device.type == "cuda":  # also ROCm, which torch exposes as cuda
        return CUDA_RULES
    return None


def pad_weight(weight: torch.Tensor, rules: GemmRules) -> torch.Tensor:
    """The int8 weight [N, K] zero-padded to the device's K and N multiples (the same tensor if none)."""
    n, k = weight.shape
    pn, pk = rules.padded_n(n) - n, rules.padded_k(k) - k
    if not (pn or pk):
        return weight
    return F.pad(weight, (0, pk, 0, pn))


def int8_mm(x8: torch.Tensor, weight: torch.Tensor, rules: GemmRules, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [M, N] = x8 [M, K] · weight[:N]ᵀ, where `weight` is [N', K'] already padded by pad_weight.

    `out` (int32 [M, N], contiguous) receives the result without a new allocation when no row or
    column padding is needed; otherwise the padded product is computed and its top-left block copied.
    The stored [N, K] weight is passed as a transposed view: a per-call transposed copy (what
    comfy-kitchen's eager path does) costs more than the GEMM itself at small M.
    """
    m, k = x8.shape
    n_pad, k_pad = weight.shape
    rows = rules.padded_rows(m)
    if rows != m or k_pad != k:
        x8 = F.pad(x8, (0, k_pad - k, 0, rows - m))
    n = out.shape[1] if out is not None else n_pad
    if out is not None and rows == m and n == n_pad:
        return torch._int_mm(x8, weight.t(), out=out)
    acc = torch._int_mm(x8, weight.t())
    if out is None:
        return acc[:m, :n]
    out.copy_(acc[:m, :n])
    return out


def rescale_(acc: torch.Tensor, act_scale: torch.Tensor, weight_scale_row: torch.Tensor,
             bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out = acc · act_scale · weight_scale (+ bias), in fp32, in two fused passes; `acc` is scratch.

    The int32 accumulator is turned into fp32 in its own memory (same element size), and `out` may
    be that same memory when the output is fp32: a layer then allocates exactly one M×N buffer —
    its output — like a float matmul does. Fresh large buffers are page-faulted on every call on
    Linux, which made the eager dequantization of the public packs cost as much as the GEMM.
    """
    as_float = acc.view(torch.float32)
    torch.mul(acc, weight_scale_row, out=as_float)
    if bias is not None:
        torch.addcmul(bias, as_float, act_scale, out=out)
    else:
        torch.mul(as_float, act_scale, out=out)
    return out


def gemm_rescale(x8: torch.Tensor, act_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, n: int, out_dtype: torch.dtype, rules: GemmRules) -> torch.Tensor:
    """out [M, n] in `out_dtype` = (x8 · weight[:n]ᵀ) · act_scale · weight_scale + bias.

    On CPU, wide outputs are produced in column blocks: GEMM into a cache-sized int32 block, then
    rescale it straight into the output. The weight is still read once (each block reads its own
    rows), and the only large write is the output itself.
    """
    m = x8.shape[0]
    device = x8.device
    w_row = weight_scale.view(1, n) if weight_scale.dim() else weight_scale
    block = n
    if device.type == "cpu" and m * n * 4 > _EPILOGUE_BLOCK_BYTES:
        blocks = -(-m * n * 4 // _EPILOGUE_BLOCK_BYTES)          # equal blocks: no thin last GEMM
        block = -(-n // blocks // 64) * 64
    if block >= n:
        if device.type == "cpu" and weight.shape[0] == n and _SWAP_MAX_ROWS_PER_K * x8.shape[1] >= m:
            # Weight as the left operand, activations transposed on the right: oneDNN then reorders
            # the small activation instead of the whole weight on every call — 1.2-2.2× faster at
            # M ≤ 256 for big layers (4096² at M = 16 went from 0.8× bf16 to 1.8×). The epilogue
            # reads the [N, M] accumulator transposed; worth it only while it stays in cache.
            out, acc_t = None, scratch("acc", (n, m), torch.int32, device)
            torch._int_mm(weight, x8.t(), out=acc_t)
            acc = acc_t.t()
        elif device.type != "cpu" and out_dtype == torch.float32:
            out = torch.empty(m, n, dtype=out_dtype, device=device)
            acc = out.view(torch.int32)             # the accumulator becomes the output in place
            int8_mm(x8, weight, rules, out=acc)
        else:
            out, acc = None, scratch("acc", (m, n), torch.int32, device)
            int8_mm(x8, weight, rules, out=acc)
        fused = int8_fused.rescale(acc, w_row, act_scale, bias)
        if fused is not None:
            return fused if out_dtype == torch.float32 else fused.to(out_dtype)
        if out is None:
            out = torch.empty(m, n, dtype=out_dtype, device=device)
        return rescale_(acc, act_scale, w_row, bias, out)
    out = torch.empty(m, n, dtype=out_dtype, device=device)
    flat = scratch("acc", (m * block,), torch.int32, device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        acc = flat[: m * (stop - start)].view(m, stop - start)
        torch._int_mm(x8, weight[start:stop].t(), out=acc)
        w_blk = w_row[:, start:stop] if w_row.dim() else w_row
        b_blk = None if bias is None else bias[start:stop]
        fused = int8_fused.rescale(acc, w_blk, act_scale, b_blk)
        if fused is not None:
            out[:, start:stop].copy_(fused)
        else:
            rescale_(acc, act_scale, w_blk, b_blk, out[:, start:stop])
    return out
