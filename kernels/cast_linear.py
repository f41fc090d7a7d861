"""The one Linear that stores its weight narrower than it computes (bf16, fp8, scaled fp8).

Every model family's float Linears are this layer (Wan's DiT, T5, CLIP vision and speech
adapters, Anima's DiT, LLM adapter and Qwen3, wav2vec2) and the INT8 loader's fp8 layers are its
`Fp8Linear` form, so storage, the fp8 matmul choice, LoRA's dequantize/requantize protocol and
block swap treat them all alike. The weight (and bias) follow the input's dtype and device at call
time, one layer at a time: fp8 storage halves weight memory without an fp8 matmul, a trainer
picks its compute dtype without converting the model, and a layer a host left in RAM still
computes on the input's device.

Two scale roundings exist because the two file layouts define them differently, and each is kept
bit for bit: `CastLinear` multiplies the upcast weight by the scale in the compute dtype (ComfyUI's
`scale_weight` scaled-fp8 rule, which Wan's and kijai's fp8 files follow); `Fp8Linear` (ComfyUI's
`float8_*` + `comfy_quant` layout) multiplies in fp32 and rounds once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8
from .int8 import encode_comfy_quant
from .precision import is_fp8

# Activation dtypes the fp8 matmul path takes (the float outputs `torch._scaled_mm` is fast for);
# fp32 activations ask for accuracy and get the widening path.
FAST_FP8_INPUTS = (torch.bfloat16, torch.float16)


class CastLinear(nn.Linear):
    """A Linear whose weight may be stored narrower (fp8, optionally with a scale) than it computes.

    The weight is upcast to the activation dtype (and moved to its device) inside forward; after
    `use_fp8_matmul()` (a loader's `_fast` choice) a supporting GPU multiplies in fp8 instead.
    `dequantize`/`requantize` are the protocol LoRA merging uses for every quantized layer kind
    (this one and int8).
    """

    weight_scale: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight_scale", None)
        self.fp8_matmul = False     # set by use_fp8_matmul()

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        """The effective weight as a float tensor of `dtype` (scale applied), on `device` (default: its own)."""
        weight = self.weight.to(device=device, dtype=dtype)
        if self.weight_scale is not None:
            scale = self.weight_scale.to(device=weight.device, dtype=dtype)
            # scale the fresh upcast copy in place (one pass less over the weight), never the parameter
            weight = weight * scale if weight is self.weight else weight.mul_(scale)
        return weight

    def requantize(self, weight: torch.Tensor) -> None:
        """Store a float weight back in this layer's storage dtype, in place.

        A scaled layer picks a fresh scale (a LoRA can widen the weight's range, and the old scale
        would saturate it); one scale per row if the layer had one per row.
        """
        storage = self.weight.dtype
        with torch.no_grad():
            if self.weight_scale is None:
                if is_fp8(storage):
                    weight = weight.clamp(-fp8.fp8_max(storage), fp8.fp8_max(storage))
                self.weight.copy_(weight.to(storage))
                return
            per_row = self.weight_scale.numel() > 1
            q, scale = fp8.quantize_scaled_fp8(weight, storage, per_row=per_row)
            self.weight.copy_(q)
            self.weight_scale = scale.reshape(self.weight_scale.shape).to(self.weight_scale.device)

    def use_fp8_matmul(self) -> bool:
        """Switch this layer to fp8 × fp8 matmul (`fp8_e4m3fn_fast`); False where its storage cannot.

        Needs fp8 storage with one scale for the whole weight (what the loaders write): the
        activations get one dynamic scale per call, and `torch._scaled_mm` takes tensorwise scales.
        """
        scalar_scale = self.weight_scale is None or self.weight_scale.numel() == 1
        self.fp8_matmul = is_fp8(self.weight.dtype) and scalar_scale
        return self.fp8_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul and x.dtype in FAST_FP8_INPUTS and fp8.fp8_matmul_usable(x, self.weight):
            return fp8.fp8_linear(x, self.weight, self.weight_scale, self.bias, fast=True)
        weight = self.dequantize(x.dtype, x.device)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        storage = str(self.weight.dtype).removeprefix("torch.")
        scaled = "none" if self.weight_scale is None else ("row" if self.weight_scale.numel() > 1 else "tensor")
        return f"{super().extra_repr()}, storage={storage}, scale={scaled}, fp8_matmul={self.fp8_matmul}"


class Fp8Linear(CastLinear):
    """A CastLinear built from stored scaled-fp8 tensors, in ComfyUI's `float8_*` layout: its state
    dict carries `comfy_quant`, and the scale multiplies in fp32 (`fp8.dequantize_scaled_fp8`)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, fast: bool = False):
        nn.Module.__init__(self)     # the tensors are given: no nn.Linear init of a weight to throw away
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("weight_scale", scale.float().reshape(()))
        self.fp8_matmul = bool(fast)

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        weight = self.weight if device is None else self.weight.to(device)
        return fp8.dequantize_scaled_fp8(weight, self.weight_scale, dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "comfy_quant"] = encode_comfy_quant(fp8.fp8_comfy_quant_config(self.weight.dtype))
