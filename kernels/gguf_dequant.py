"""Dequantizing GGUF (ggml) quantized tensors in torch, on whatever device the bytes live on.

A ggml tensor is a run of fixed-size blocks along its last (row) axis: each block packs
`block_size` weights into `type_size` bytes — integer codes plus one or more fp16 scales. The
formulas here are the ggml block layouts (the same ones the `gguf` package's numpy reference
implements); they are written as torch ops so the weight of one layer can be expanded on the GPU
right before its matmul, which is what keeps a GGUF model small in VRAM.

The file-level mixes people download (Q4_K_M, Q5_K_S, Q3_K_L, ...) are not types of their own:
they choose one of the per-tensor types below for each tensor (e.g. Q4_K_M = mostly Q4_K, some
tensors Q6_K). So supporting the per-tensor types supports every mix.

Every decoder takes blocks as uint8 [n_blocks, type_size] and returns float32 [n_blocks,
block_size]; `dequantize` wraps them for a whole tensor. Integer unpacking is done in uint8/int32
and the products in float32, so the result is exactly the reference's up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

QK_K = 256  # weights per "super-block" of the K types


@dataclass(frozen=True)
class QuantType:
    """One ggml tensor type: its GGUF id, block geometry and decoder (None: a plain float type)."""

    name: str
    ggml_id: int
    block_size: int
    type_size: int
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    float_dtype: torch.dtype | None = None
    scale_offsets: tuple[int, ...] = ()   # byte offsets of the block's fp16 scale fields

    def row_bytes(self, row: int) -> int:
        """Bytes one row of `row` weights takes (row must be a multiple of the block size)."""
        if row % self.block_size:
            raise ValueError(f"{self.name} packs {self.block_size} weights per block; a row of {row} does not "
                             "divide into blocks")
        return row // self.block_size * self.type_size


class UnsupportedQuantError(ValueError):
    """A GGUF tensor type this build cannot dequantize."""


_SHIFTS: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def _shifts(device: torch.device, values: Sequence[int]) -> torch.Tensor:
    key = (device, tuple(values))
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.tensor(values, dtype=torch.uint8, device=device)
    return _SHIFTS[key]


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scale at byte `start` of every block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _split_bits(packed: torch.Tensor, groups: int, shifts: Sequence[int], mask: int) -> torch.Tensor:
    """[n, groups·w] bytes -> [n, groups, len(shifts), w] fields: field s of byte b is (b >> shifts[s]) & mask.

    ggml packs the low bits of consecutive runs of w weights into the same bytes at different
    shifts; flattening the result puts each weight back at its index.
    """
    n = packed.shape[0]
    s = _shifts(packed.device, shifts).view(1, 1, -1, 1)
    return (packed.reshape(n, groups, 1, -1) >> s) & mask


# ------------------------------------------------------------------------------- 32-weight blocks


# The decoders widen the codes once and scale that tensor in place: at a few bytes per weight every
# full-size temporary costs as much time as the arithmetic.

def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).float().mul_(_f16(blocks, 0))


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 codes: low nibbles are weights 0..15, high nibbles 16..31."""
    return _split_bits(qs, 1, (0, 4), 0x0F).reshape(qs.shape[0], -1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes (a little-endian uint32) -> 32 bits, bit j belonging to weight j."""
    return _split_bits(qh, 4, range(8), 1).reshape(qh.shape[0], -1)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _nibbles(blocks[:, 2:]).float().sub_(8.0).mul_(_f16(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _nibbles(blocks[:, 4:]).float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 6:]) | (_fifth_bits(blocks[:, 2:6]) << 4)
    return q.float().sub_(16.0).mul_(_f16(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 8:]) | (_fifth_bits(blocks[:, 4:8]) << 4)
    return q.float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


# ------------------------------------------------------------------------------- K types (256 weights)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales[16] (low nibble: scale, high: min) | qs[64] 2-bit | d | dmin; 16 groups of 16
    n = blocks.shape[0]
    scales = blocks[:, :16]
    q = _split_bits(blocks[:, 16:80], 2, (0, 2, 4, 6), 0x03).reshape(n, 16, 16).float()
    step = _f16(blocks, 80) * (scales & 0x0F).float()
    offset = _f16(blocks, 82) * (scales >> 4).float()
    return q.mul_(step[:, :, None]).sub_(offset[:, :, None]).reshape(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask[32] (3rd bit, set = no -4 offset) | qs[64] 2-bit | scales[12] 6-bit, offset 32 | d
    n = blocks.shape[0]
    low = _split_bits(blocks[:, 32:96], 2, (0, 2, 4, 6), 0x03).reshape(n, QK_K)
    high = _split_bits(blocks[:, :32], 1, range(8), 1).reshape(n, QK_K)
    codes = low | (high << 2)          # 0..7; minus 4 is the signed code (bit clear = offset -4)
    packed = blocks[:, 96:108]
    lo4 = _split_bits(packed[:, :8], 1, (0, 4), 0x0F).reshape(n, 16)
    hi2 = _split_bits(packed[:, 8:12], 1, (0, 2, 4, 6), 0x03).reshape(n, 16)
    scale = (lo4 | (hi2 << 4)).to(torch.int32) - 32
    step = _f16(blocks, 108) * scale.float()
    return codes.reshape(n, 16, 16).float().sub_(4.0).mul_(step[:, :, None]).reshape(n, QK_K)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K/Q5_K): the first four of each sit in
    the low 6 bits of bytes 0..3 / 4..7; the last four take their low nibble from bytes 8..11 and
    their top two bits from the spare top bits of bytes 0..3 / 4..7."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=1)
    minimum = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=1)
    return scale, minimum


def _scaled_with_min(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d·scale·q − dmin·min over 8 groups of 32 (the shared tail of Q4_K and Q5_K)."""
    n = blocks.shape[0]
    scale, minimum = _k_scales(blocks[:, 4:16])
    d = _f16(blocks, 0)
    dmin = _f16(blocks, 2)
    return q.float().mul_((d * scale.float())[:, :, None]).sub_((dmin * minimum.float())[:, :, None]).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qs[128]: 4 runs of 32 bytes, low nibbles one group, high the next
    n = blocks.shape[0]
    return _scaled_with_min(blocks, _split_bits(blocks[:, 16:], 4, (0, 4), 0x0F).reshape(n, 8, 32))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qh[32] (bit g: 5th bit of group g) | qs[128] as in Q4_K
    n = blocks.shape[0]
    low = _split_bits(blocks[:, 48:], 4, (0, 4), 0x0F).reshape(n, 8, 32)
    high = _split_bits(blocks[:, 16:48], 1, range(8), 1).reshape(n, 8, 32)
    return _scaled_with_min(blocks, low | (high << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql[128] low nibbles | qh[64] top 2 bits | scales[16] int8 | d; codes offset by 32, 16 groups of 16
    n = blocks.shape[0]
    low = _split_bits(blocks[:, :128], 2, (0, 4), 0x0F).reshape(n, QK_K)
    high = _split_bits(blocks[:, 128:192], 2, (0, 2, 4, 6), 0x03).reshape(n, QK_K)
    codes = low | (high << 4)          # 0..63; minus 32 is the signed code
    scale = blocks[:, 192:208].view(torch.int8).float()
    step = _f16(blocks, 208) * scale
    return codes.reshape(n, 16, 16).float().sub_(32.0).mul_(step[:, :, None]).reshape(n, QK_K)


QUANT_TYPES: dict[int, QuantType] = {t.ggml_id: t for t in (
    QuantType("F32", 0, 1, 4, float_dtype=torch.float32),
    QuantType("F16", 1, 1, 2, float_dtype=torch.float16),
    QuantType("Q4_0", 2, 32, 18, _q4_0, scale_offsets=(0,)),
    QuantType("Q4_1", 3, 32, 20, _q4_1, scale_offsets=(0, 2)),
    QuantType("Q5_0", 6, 32, 22, _q5_0, scale_offsets=(0,)),
    QuantType("Q5_1", 7, 32, 24, _q5_1, scale_offsets=(0, 2)),
    QuantType("Q8_0", 8, 32, 34, _q8_0, scale_offsets=(0,)),
    QuantType("Q2_K", 10, QK_K, 84, _q2_k, scale_offsets=(80, 82)),
    QuantType("Q3_K", 11, QK_K, 110, _q3_k, scale_offsets=(108,)),
    QuantType("Q4_K", 12, QK_K, 144, _q4_k, scale_offsets=(0, 2)),
    QuantType("Q5_K", 13, QK_K, 176, _q5_k, scale_offsets=(0, 2)),
    QuantType("Q6_K", 14, QK_K, 210, _q6_k, scale_offsets=(208,)),
    QuantType("BF16", 30, 1, 2, float_dtype=torch.bfloat16),
)}
QUANT_BY_NAME: dict[str, QuantType] = {t.name: t for t in QUANT_TYPES.values()}


def random_blocks(qtype: QuantType, n_blocks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [n_blocks, type_size] of random codes with finite fp16 scales in [-2, 2): every bit pattern
    a real file can hold, for checking decoders against a reference and for timing them."""
    raw = torch.randint(0, 256, (n_blocks, qtype.type_size), dtype=torch.uint8, generator=generator)
    for start in qtype.scale_offsets:
        scales = (torch.rand(n_blocks, 1, generator=generator) * 4 - 2).to(torch.float16)
        raw[:, start:start + 2] = scales.view(torch.uint8)
    return raw


def quant_type(ggml_id: int, name: str | None = None) -> QuantType:
    """The type for a GGUF tensor-type id; UnsupportedQuantError names it and what is supported."""
    if ggml_id not in QUANT_TYPES:
        label = name or f"type {ggml_id}"
        supported = ", ".join(t.name for t in QUANT_TYPES.values())
        raise UnsupportedQuantError(f"GGUF tensor type {label} is not supported (supported: {supported}). "
                                    "Use a file quantized with one of these (the K-quant and Q8_0 files "
                                    "most models are published in are).")
    return QUANT_TYPES[ggml_id]


def dequantize(raw: torch.Tensor, qtype: QuantType, shape: Sequence[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor of `shape` (numpy/torch order, rows last) that the packed bytes `raw` hold.

    `raw` is uint8 of any shape holding exactly the tensor's blocks (a plain float type may also
    be passed in its own dtype). The result is a new tensor of `dtype` on raw's device.
    """
    shape = tuple(int(s) for s in shape)
    if qtype.decode is None:
        values = raw if raw.dtype == qtype.float_dtype else raw.contiguous().view(qtype.float_dtype)
        return values.reshape(shape).to(dtype, copy=True)
    blocks = raw.reshape(-1, qtype.type_size)
    return qtype.decode(blocks).reshape(shape).to(dtype)
