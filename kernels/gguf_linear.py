"""A Linear whose weight stays in its GGUF packed form and is expanded right before each matmul.

The packed bytes are an ordinary uint8 Parameter [out_features, bytes per row], so everything
that moves module tensors — `.to()`, block swap's flat buffers, ComfyUI-style offloading — moves
the small quantized weight, never a float copy. `forward` is deliberately plain (dequantize, then
`F.linear`) so forward hooks such as run-time LoRA adapters see the usual (input, output) pair.

LoRA merging uses the `dequantize()` / `requantize(weight)` pair every quantized layer offers. A
patched weight is stored back as Q8_0: re-encoding it in a K type would add a second rounding on
top of the file's, while Q8_0's error is far below any K type's (the cost: a merged layer takes
8.5 bits per weight instead of the file's 2.6 to 6.6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gguf_dequant import QUANT_BY_NAME, QuantType, dequantize

Q8_0 = QUANT_BY_NAME["Q8_0"]


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """Float [rows, cols] (cols a multiple of 32) -> Q8_0 bytes [rows, cols/32·34], as ggml encodes
    it: per block of 32, d = absmax/127 stored as fp16, codes round(x/d) (half away from zero)."""
    rows, cols = weight.shape
    blocks = weight.detach().float().reshape(-1, Q8_0.block_size)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    scaled = blocks * inv
    codes = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).to(torch.int8)
    packed = torch.cat([d.to(torch.float16).view(torch.uint8), codes.view(torch.uint8)], dim=1)
    return packed.reshape(rows, Q8_0.row_bytes(cols))


class GGUFLinear(nn.Module):
    """y = x·Wᵀ + b with W held as GGUF blocks of `qtype` (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, qtype: QuantType, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if qtype.decode is None:
            raise ValueError(f"GGUFLinear holds quantized weights; a {qtype.name} weight belongs in a plain Linear")
        self.in_features = in_features
        self.out_features = out_features
        self.qtype = qtype
        packed = torch.empty(out_features, qtype.row_bytes(in_features), dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(packed, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a float [out_features, in_features] tensor of `dtype`, on the weight's device."""
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype)

    @torch.no_grad()
    def requantize(self, weight: torch.Tensor) -> None:
        """Store a float weight (e.g. with a LoRA merged in) back in this layer, as Q8_0."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit this layer "
                             f"({self.out_features}, {self.in_features})")
        self.weight = nn.Parameter(quantize_q8_0(weight).to(self.weight.device), requires_grad=False)
        self.qtype = Q8_0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}, " \
               f"bias={self.bias is not None}"
