"""Scaled fp8 weight storage: the one fp8 quantizer and the fp8 matmul, for every family and loader.

A plain cast to float8_e4m3fn loses the small weights of wide layers: |w| ≈ 1/√K drifts into the
e4m3 subnormal range, so a 8960-wide layer is 2× less accurate cast than scaled (measured on Wan-shaped layers).
Here a weight is stored as fp8(w / s) with an fp32 scale s = absmax / fp8_max — one per tensor
(the `float8_*` layout ComfyUI writes as `weight` + `weight_scale` + `comfy_quant`) or one per row.
The layer that holds such weights and upcasts them per call is kernels/cast_linear.py; on GPUs
with fp8 tensor cores (`torch._scaled_mm`, compute capability ≥ 8.9) `fp8_linear` multiplies in
fp8 instead. The math works through row chunks so loaders never hold a full-size fp32 copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .precision import device_capability, is_fp8, supports_fp8_matmul

# ComfyUI's `comfy_quant` format name of each fp8 storage dtype.
FP8_FORMAT_OF = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


def fp8_comfy_quant_config(dtype: torch.dtype) -> dict:
    """The per-layer `comfy_quant` JSON ComfyUI reads for a scaled fp8 layer stored in `dtype`."""
    return {"format": FP8_FORMAT_OF[dtype]}


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def as_weight_scale(scale: torch.Tensor) -> torch.Tensor:
    """A file's weight scale in the shape that broadcasts over an [out, in] weight: a scalar for one
    scale per tensor, [out, 1] for one per row (files store those as [out] or [out, 1])."""
    return scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())


# fp32 bytes per row chunk: small on the CPU, where freed full-size temporaries fragment the heap
# of a loading process; large elsewhere, where each chunk is a few kernel launches.
CPU_CHUNK_BYTES = 1 << 20
DEVICE_CHUNK_BYTES = 1 << 28


def float_row_chunks(weight: torch.Tensor, source_scale: torch.Tensor | None = None,
                     chunk_bytes: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, fp32 rows) of a weight viewed as [rows, -1], ~chunk_bytes at a time, with an
    optional file scale applied. A chunk may alias the weight: never modify it in place.

    Converting or quantizing through small chunks means no full-size fp32 temporary ever exists,
    which matters while a model is loading: freed large temporaries between the kept tensors
    fragment the heap, and the holes count as resident memory.
    """
    rows = weight.reshape(weight.shape[0] if weight.dim() else 1, -1)
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if rows.device.type == "cpu" else DEVICE_CHUNK_BYTES
    scale = None if source_scale is None else as_weight_scale(source_scale).to(rows.device, torch.float32)
    step = max(1, chunk_bytes // max(1, 4 * rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].float()
        if scale is not None:
            chunk = chunk * (scale[start:start + step] if scale.dim() else scale)
        yield start, chunk


def dequantize_into(out: torch.Tensor, weight: torch.Tensor, source_scale: torch.Tensor | None) -> torch.Tensor:
    """out[...] = weight · scale, chunk by chunk (out may be on another device or dtype)."""
    flat = out.view(out.shape[0] if out.dim() else 1, -1)
    for start, chunk in float_row_chunks(weight, source_scale):
        flat[start:start + chunk.shape[0]] = chunk
    return out


def quantize_scaled_fp8(weight: torch.Tensor, dtype: torch.dtype, *, per_row: bool = False,
                        out: torch.Tensor | None = None, source_scale: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale) with scale = absmax / fp8_max (a scalar, or [out, 1] with `per_row`),
    saturating out-of-range values (e4m3fn has no infinity: a plain cast would make them NaN).

    Written into `out` if given (preallocated by a loader); `source_scale` dequantizes a scaled
    input first. Works through fp32 row chunks (`float_row_chunks`): the absmax and the quotient
    are those of the whole-tensor computation, without a full-size fp32 copy of the weight.
    """
    if not is_fp8(dtype):
        raise ValueError(f"{dtype} is not an fp8 dtype")
    limit = fp8_max(dtype)
    absmax = torch.cat([chunk.abs().amax(dim=1) for _, chunk in float_row_chunks(weight, source_scale)])
    scale = (absmax[:, None] if per_row else absmax.amax()).div(limit).clamp_min(1e-30)
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    flat = out.view(out.shape[0] if out.dim() else 1, -1)
    for start, chunk in float_row_chunks(weight, source_scale):
        part = scale[start:start + chunk.shape[0]].to(chunk.device) if per_row else scale.to(chunk.device)
        flat[start:start + chunk.shape[0]] = torch.div(chunk, part).clamp_(-limit, limit)
    return out, scale


def quantize_fp8_with_scale(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8(weight / scale) on a given scale, saturating (in-place LoRA updates keep the old scale)."""
    limit = fp8_max(dtype)
    return (weight.float() / scale.float()).clamp_(-limit, limit).to(dtype)


def dequantize_scaled_fp8(weight: torch.Tensor, scale: torch.Tensor | None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight: fp8 upcast, multiplied by its scale in fp32 (scale None = plain cast file)."""
    w = weight.to(torch.float32)
    if scale is not None:
        w = w * scale.to(device=w.device, dtype=torch.float32)
    return w.to(dtype)


def fp8_matmul_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `torch._scaled_mm` is both supported and worth it: CUDA with SM ≥ 8.9, /16 shapes."""
    if x.device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    n, k = weight.shape
    return supports_fp8_matmul(device_capability(x.device)) and k % 16 == 0 and n % 16 == 0


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
               fast: bool = False) -> torch.Tensor:
    """y = x · (weight·scale)ᵀ + bias in x's dtype; fp8 × fp8 matmul when `fast` (caller checked support)."""
    if not fast:
        w = dequantize_scaled_fp8(weight, scale, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    limit = fp8_max(weight.dtype)
    x_scale = (x2d.abs().amax().float() / limit).clamp_min(1e-30)
    x8 = (x2d.float() / x_scale).clamp_(-limit, limit).to(weight.dtype)
    w_scale = scale.float() if scale is not None else torch.ones((), device=x.device)
    out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=w_scale.reshape(()),
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])
