"""Symmetric int8 quantization and the W8A8 linear layer.

Weights: one scale per output row (`[N, 1]`, what on-the-fly quantization writes) or one per
tensor (`[]`, read from files), scale = absmax / 127, round to nearest, clamp to ±127. Optional
ConvRot rotation (kernels/hadamard.py) in groups of 256 before quantizing; the group size travels
with the layer so a saved file reloads exactly.

Activations: one dynamic scale per token row — with token outliers a per-tensor scale is 5× less
accurate at the same cost. The forward is quantize → `torch._int_mm` → one fused
rescale + bias, returning the input's dtype (fp32 in, fp32 out; the public packs returned bf16).

On CPU the fp32 work is done in row chunks that stay in cache: the eager abs/amax/div/round
sequence over a whole 36 MB activation allocates several fresh buffers per call, each of which
the kernel must page-fault in, and that alone cost as much as the GEMM.
"""

from __future__ import annotations

import json
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from . import hadamard, int8_fused, int8_kitchen, int8_onednn
from .int8_gemm import GemmRules, gemm_rescale, pad_weight, rules_for, scratch

INT8_MAX = 127
MIN_SCALE = 1e-30          # all-zero rows keep a finite scale and quantize to zeros
_CHUNK_BYTES = 1024 * 1024  # fp32 bytes per row chunk on CPU: stays in L2/L3 between the passes
FORMAT = "int8_tensorwise"  # ComfyUI's format name; granularity comes from the scale's shape
# int8 layer calls per GEMM backend in this process (what ran, for notes and tests; one dict add per call)
_BACKEND_CALLS: Counter = Counter()


class QuantizationError(ValueError):
    """A tensor that cannot be quantized (NaN/Inf, wrong rank, impossible rotation)."""


def _rows_per_chunk(t: torch.Tensor, k: int) -> int:
    if t.device.type != "cpu":
        return max(t.shape[0], 1)   # GPUs want one big kernel, not a Python loop
    return max(1, _CHUNK_BYTES // (4 * max(k, 1)))


def _round_(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Round in place: to nearest (even), or stochastically (floor(t + U[0,1))) with a generator."""
    if generator is None:
        return t.round_()
    noise = torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)
    return t.add_(noise).floor_()


def _generator(seed: int, device: torch.device) -> torch.Generator | None:
    if seed <= 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def _check_finite(t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise QuantizationError(f"{bad} NaN/Inf value(s): the weights are damaged or were saved in a dtype "
                                "that overflowed; int8 cannot represent them")


def quantize_weight(weight: torch.Tensor, per_row: bool = True, rotation_group: int = 0,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], fp32 scale [N, 1] or []) of a float weight [N, K].

    Computed in fp32 from any float dtype, in row chunks so an fp32 copy of a 4096² weight never
    exists at once. `rotation_group` > 0 rotates first (ConvRot; needs per_row). `seed` > 0 rounds
    stochastically with a deterministic generator — used when re-quantizing a LoRA-patched weight,
    where round-to-nearest would snap most small deltas back onto the old grid.
    """
    if weight.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise QuantizationError(f"expected a float weight, got {weight.dtype}")
    if rotation_group and not per_row:
        raise QuantizationError("a rotated weight needs per-row scales")
    n, k = weight.shape
    if rotation_group and (k % rotation_group or not hadamard.is_valid_group(rotation_group)):
        raise QuantizationError(f"cannot rotate {k} input channels in groups of {rotation_group}")
    gen = _generator(seed, weight.device)
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    if not per_row:
        _check_finite(weight)
        scale = (weight.abs().amax().float() / INT8_MAX).clamp_min(MIN_SCALE)
        step = _rows_per_chunk(weight, k)
        for i in range(0, n, step):
            chunk = torch.div(weight[i:i + step].float(), scale)
            q[i:i + step].copy_(_round_(chunk, gen).clamp_(-INT8_MAX, INT8_MAX))
        return q, scale
    scale = torch.empty(n, 1, dtype=torch.float32, device=weight.device)
    step = _rows_per_chunk(weight, k)
    for i in range(0, n, step):
        chunk = weight[i:i + step]
        chunk = hadamard.rotate(chunk, rotation_group) if rotation_group else chunk.to(torch.float32, copy=True)
        _check_finite(chunk)
        s = (chunk.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min_(MIN_SCALE)
        scale[i:i + step] = s
        q[i:i + step].copy_(_round_(chunk.div_(s), gen).clamp_(-INT8_MAX, INT8_MAX))
    return q, scale


def requantize_weight(weight: torch.Tensor, old_scale: torch.Tensor, rotation_group: int = 0,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8, fresh scale) of a patched float weight (LoRA merging) in the layer's own granularity:
    per row if its old scale was per row or it is rotated (a rotated weight needs per-row scales)."""
    per_row = old_scale.dim() > 0 or rotation_group > 0
    return quantize_weight(weight, per_row=per_row, rotation_group=rotation_group, seed=seed)


def quantize_with_scale(weight: torch.Tensor, scale: torch.Tensor, rotation_group: int = 0,
                        seed: int = 0) -> torch.Tensor:
    """int8 of a float weight on a *given* scale (saturating at ±127), e.g. an in-place LoRA update
    whose undo will copy the old int8 data back without its scale."""
    w = hadamard.rotate(weight, rotation_group) if rotation_group else weight.to(torch.float32, copy=True)
    w.div_(scale.to(device=w.device, dtype=torch.float32))
    return _round_(w, _generator(seed, w.device)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                      rotation_group: int = 0) -> torch.Tensor:
    """The float weight [N, K] in the original (unrotated) basis: (q · scale) · H per group."""
    w = q.to(torch.float32) * scale.to(device=q.device, dtype=torch.float32)
    if rotation_group:
        w = hadamard.rotate(w, rotation_group)
    return w.to(dtype)


def canonical_scale(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """A weight scale as fp32 `[]` (one value) or `[N, 1]` (per row); anything else is refused.

    Files write per-row scales as [N, 1], [N] or [1, N]; an [N] vector broadcast against [N, K]
    would scale columns instead of rows, which is silently wrong when N == K.
    """
    scale = scale.detach().to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == out_features and scale.dim() <= 2:
        return scale.reshape(out_features, 1)
    raise QuantizationError(f"weight scale of shape {tuple(scale.shape)} fits neither one scale nor one per "
                            f"output row ({out_features}); blockwise scales are not supported — dequantize "
                            "the file to bf16 and quantize it on the fly instead")


def quantize_activation(x2d: torch.Tensor, rotation_group: int = 0, temporary: bool = False,
                        unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [M, K], fp32 scale [M, 1]) of activations, one symmetric scale per row.

    Rotation (ConvRot) happens chunk by chunk right before quantizing, so the rotated fp32 copy of
    the activation never exists in full. `temporary=True` returns reused scratch memory, valid
    only until the next int8 call on this thread (what int8_linear wants). `unsigned=True` stores
    the same values as uint8 q + 128 (oneDNN's prepacked kernel takes that form).
    """
    fused = None
    if not (rotation_group and x2d.device.type == "cpu"):
        # Rotated CPU activations stay on the chunked loop below: its two small GEMMs per chunk
        # (hadamard.rotate_kron) ran 5-10x faster than the compiled rotation, which lowers the
        # 16x16 products to scalar loops over the whole activation.
        fused = int8_fused.quantize_rows_u8(x2d, rotation_group) if unsigned else \
            int8_fused.quantize_rows(x2d, rotation_group)
    if fused is not None:
        return fused
    m, k = x2d.shape
    dev = x2d.device
    step = _rows_per_chunk(x2d, k)
    buf = scratch("qchunk", (min(step, m), k), torch.float32, dev)
    work = scratch("qwork", (min(step, m), k), torch.float32, dev) if rotation_group else None
    if temporary:
        q, scale = scratch("x8", (m, k), torch.int8, dev), scratch("xscale", (m, 1), torch.float32, dev)
    else:
        q = torch.empty(m, k, dtype=torch.int8, device=dev)
        scale = torch.empty(m, 1, dtype=torch.float32, device=dev)
    for i in range(0, m, step):
        src = x2d[i:i + step]
        b = buf[:src.shape[0]]
        if rotation_group:
            src = hadamard.rotate_kron(src, rotation_group, out=b, work=work[:src.shape[0]])
        s = scale[i:i + step]
        if src.dtype == torch.float32:
            torch.amax(src.abs(), dim=1, keepdim=True, out=s)
        else:
            s.copy_(src.abs().amax(dim=1, keepdim=True))   # exact: the max of bf16/fp16 values
        s.div_(INT8_MAX).clamp_min_(MIN_SCALE)
        torch.div(src, s, out=b)                           # bf16/fp16 / fp32 -> fp32, no separate upcast
        q[i:i + step].copy_(b.round_())
    return (int8_onednn.to_unsigned_(q), scale) if unsigned else (q, scale)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                rotation_group: int = 0, rules: GemmRules | None = None,
                out_features: int | None = None) -> torch.Tensor:
    """W8A8 linear: y = x · dequant(weight)ᵀ + bias, in x's dtype, with an int8 GEMM.

    `weight` is int8 [N', K'] already padded for `rules` (pad_weight); `weight_scale` is `[]` or
    `[N, 1]`. N, the real out features, must be given as `out_features` when neither a per-row
    scale nor a bias tells it (the padded weight's N' would add columns of zeros to the output).
    Use Int8Linear unless you manage padding yourself.
    """
    rules = rules or rules_for(x.device)
    k = x.shape[-1]
    if out_features is not None:
        n = out_features
    else:
        n = weight_scale.shape[0] if weight_scale.dim() else (bias.shape[0] if bias is not None else weight.shape[0])
    x2d = x.reshape(-1, k)
    x8, act_scale = quantize_activation(x2d, rotation_group, temporary=True)
    out = gemm_rescale(x8, act_scale, weight, weight_scale, bias, n, x.dtype, rules)
    return out.view(*x.shape[:-1], n)


def comfy_quant_config(rotation_group: int) -> dict:
    """The per-layer `comfy_quant` JSON ComfyUI reads for an int8 layer."""
    conf: dict = {"format": FORMAT}
    if rotation_group:
        conf.update({"convrot": True, "convrot_groupsize": int(rotation_group)})
    return conf


def rotation_group_of(conf: dict) -> int:
    """The ConvRot group of a canonical int8 `comfy_quant` (the inverse of comfy_quant_config); 0 = none."""
    return int(conf.get("convrot_groupsize", hadamard.DEFAULT_GROUP)) if conf.get("convrot") else 0


def encode_comfy_quant(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def decode_comfy_quant(t: torch.Tensor) -> dict:
    try:
        conf = json.loads(bytes(t.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizationError(f"comfy_quant tensor is not UTF-8 JSON ({exc})") from exc
    if not isinstance(conf, dict):
        raise QuantizationError("comfy_quant JSON is not an object")
    return conf


def padded_weight(owner, weight: torch.Tensor, rules: GemmRules) -> torch.Tensor:
    """`weight` padded to the device's GEMM multiples, cached on `owner` per (weight object, rules)."""
    if rules.padded_k(weight.shape[1]) == weight.shape[1] and rules.padded_n(weight.shape[0]) == weight.shape[0]:
        return weight
    cached = getattr(owner, "_padded", None)
    if cached is None or cached[0] is not weight or cached[1] != rules:
        cached = (weight, rules, pad_weight(weight, rules))
        owner._padded = cached
    return cached[2]


def cpu_packed(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in the CPU's prepacked int8 layout where that backend runs here, else unchanged.

    Call it wherever a layer takes a new int8 weight (load, LoRA re-quantization, move to CPU):
    the plain tensor is then free to go, so a packed layer costs one copy of its weight.
    """
    packed = int8_onednn.pack(weight)
    return weight if packed is None else packed


def kernel_note(device: torch.device, rotated_layers: int = 0) -> str:
    """What the loader's log says about how int8 layers will run on `device` (CPU: the backend this
    machine selected and its features; ConvRot's extra work when layers are rotated)."""
    if device.type != "cpu":
        return ""
    note = f"int8 CPU kernel: {int8_onednn.describe()}"
    if rotated_layers:
        note += (f"; ConvRot on {rotated_layers} layers rotates each activation row in fp32 before quantizing "
                 "(two 16x16 Hadamard products per 256 channels, ~32 multiply-adds per value): on CPU about "
                 "15-20% more time per int8 transformer block than without it (benchmarks/int8_model.py "
                 "measures it)")
    return note


def backend_calls() -> dict[str, int]:
    """{backend name: int8 layer calls} in this process so far (int8_onednn's names; "float" for
    the dequantized fallback)."""
    return dict(_BACKEND_CALLS)


def _packed_linear(x: torch.Tensor, weight, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                   rotation_group: int) -> torch.Tensor | None:
    k = x.shape[-1]
    x8, act_scale = quantize_activation(x.reshape(-1, k), rotation_group, temporary=True, unsigned=True)
    out = int8_onednn.linear(x8, act_scale, weight, weight_scale, bias, x.dtype)
    return None if out is None else out.view(*x.shape[:-1], weight.shape[0])


def run_int8(owner, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
             rotation_group: int) -> torch.Tensor:
    """The forward of any int8 layer (`owner` keeps the padding cache and the fallback counters).

    A prepacked weight (cpu_packed) runs oneDNN's packed kernel; if oneDNN refuses the call, the
    layer keeps a plain copy and runs `torch._int_mm` from then on, counted in
    `owner.int_mm_fallback_calls` (and logged once per process). Where the device has no int8
    GEMM, the weight is dequantized and a float matmul runs — counted in `owner.fallback_calls`
    — so a report can say so instead of the slowdown going unnoticed.
    """
    if bias is not None and bias.device != x.device:
        bias = bias.to(x.device)
    if isinstance(weight, int8_onednn.PackedInt8Weight):
        if x.device.type == "cpu" and x.is_floating_point() and getattr(owner, "_unpacked", None) is None:
            out = _packed_linear(x, weight, weight_scale, bias, rotation_group)
            if out is not None:
                _BACKEND_CALLS[int8_onednn.BACKEND_PREPACKED] += 1
                return out
        cached = getattr(owner, "_unpacked", None)
        if cached is None or cached[0] is not weight.packed:
            cached = (weight.packed, weight.dense())
            owner._unpacked = cached
        owner.int_mm_fallback_calls = getattr(owner, "int_mm_fallback_calls", 0) + 1
        weight = cached[1].to(x.device)
    rules = rules_for(x.device)
    if rules is not None and x.is_floating_point():
        fused = int8_kitchen.linear(x, weight, weight_scale, bias, rotation_group)
        if fused is not None:
            _BACKEND_CALLS["comfy_kitchen"] += 1
            return fused
        _BACKEND_CALLS[int8_onednn.BACKEND_INT_MM] += 1
        return int8_linear(x, padded_weight(owner, weight, rules), weight_scale, bias, rotation_group, rules,
                           out_features=weight.shape[0])
    owner.fallback_calls = getattr(owner, "fallback_calls", 0) + 1
    _BACKEND_CALLS["float"] += 1
    dtype = x.dtype if x.is_floating_point() else torch.float32
    w = dequantize_weight(weight, weight_scale, dtype, rotation_group).to(x.device)
    return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))


class Int8Linear(nn.Module):
    """A Linear layer holding an int8 weight [N, K] and its scale(s); runs W8A8.

    State dict = ComfyUI's official `int8_tensorwise` layout: `weight` (I8), `weight_scale` (F32,
    [] or [N, 1]), `comfy_quant` (U8 JSON, with `convrot` flags when rotated), `bias` (float).
    Parameters never require grad: int8 tensors cannot, and ComfyUI's loaders fail on ones that try.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None, per_row: bool = True, rotation_group: int = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rotation_group = int(rotation_group)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        scale_shape = (out_features, 1) if per_row else ()
        self.weight_scale = nn.Parameter(torch.ones(scale_shape, dtype=torch.float32, device=device),
                                         requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Per-instance counters of the rare paths, read by int8_report(); never touched per int8 call.
        self.fallback_calls = 0
        self.int_mm_fallback_calls = 0
        self._padded: tuple[torch.Tensor, GemmRules, torch.Tensor] | None = None
        self._unpacked: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_float(cls, linear: nn.Linear, rotation_group: int = 0, seed: int = 0) -> Int8Linear:
        """Quantize an nn.Linear (per-row scales; ConvRot when rotation_group > 0)."""
        q, scale = quantize_weight(linear.weight.detach(), per_row=True, rotation_group=rotation_group, seed=seed)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_quantized(q, scale, bias, rotation_group)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       rotation_group: int = 0) -> Int8Linear:
        """Wrap already-quantized tensors (as read from a file) without copying the int8 weight."""
        if q.dtype != torch.int8 or q.dim() != 2:
            raise QuantizationError(f"expected an int8 [N, K] weight, got {q.dtype} {tuple(q.shape)}")
        n, k = q.shape
        scale = canonical_scale(scale, n)
        if rotation_group and (k % rotation_group or not hadamard.is_valid_group(rotation_group)):
            raise QuantizationError(f"ConvRot group {rotation_group} does not divide {k} input channels")
        layer = cls(k, n, bias=bias is not None, device="meta", per_row=scale.dim() > 0,
                    rotation_group=rotation_group)
        layer.weight = nn.Parameter(cpu_packed(q), requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.to(q.device), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(q.device), requires_grad=False)
        return layer

    # ------------------------------------------------------------------ compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_int8(self, x, self.weight, self.weight_scale, self.bias, self.rotation_group)

    def requantize(self, weight: torch.Tensor, seed: int = 0) -> None:
        """Store a patched float weight (original basis) with fresh per-row scales (LoRA merging).

        A `seed` > 0 rounds stochastically: with round-to-nearest most of a small LoRA delta would
        snap back onto the old int8 grid and the LoRA would seem to do nothing.
        """
        q, scale = requantize_weight(weight.to(self.weight.device), self.weight_scale, self.rotation_group, seed)
        self.weight = nn.Parameter(cpu_packed(q), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self._padded = self._unpacked = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight in the original basis (rotation undone)."""
        return dequantize_weight(self.weight, self.weight_scale, dtype, self.rotation_group)

    def extra_repr(self) -> str:
        granularity = "per-row" if self.weight_scale.dim() else "per-tensor"
        rot = f", convrot={self.rotation_group}" if self.rotation_group else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, {granularity}{rot}"

    # ------------------------------------------------------------------ state dict (official format)

    def _apply(self, fn, recurse=True):
        # .half()/.to(bf16) must not touch the scale: an fp16 scale loses precision and
        # no longer matches what the file holds. int8 weights are never converted by torch.
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = nn.Parameter(self.weight_scale.float(), requires_grad=False)
        if self.weight.device.type == "cpu" and not isinstance(self.weight, int8_onednn.PackedInt8Weight):
            self.weight = nn.Parameter(cpu_packed(self.weight.data), requires_grad=False)   # back from a GPU
        self._padded = self._unpacked = None
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if isinstance(self.weight, int8_onednn.PackedInt8Weight):   # savers need the plain layout
            destination[prefix + "weight"] = self.weight.dense()
        destination[prefix + "comfy_quant"] = encode_comfy_quant(comfy_quant_config(self.rotation_group))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        conf_t = state_dict.get(prefix + "comfy_quant")
        weight = state_dict.get(prefix + "weight")
        scale = state_dict.get(prefix + "weight_scale")
        bias = state_dict.get(prefix + "bias")
        for name, value in (("weight", weight), ("weight_scale", scale)):
            if value is None:
                missing_keys.append(prefix + name)
        if self.bias is not None and bias is None:
            missing_keys.append(prefix + "bias")
        if weight is None or scale is None:
            return
        try:
            conf = decode_comfy_quant(conf_t) if conf_t is not None else {"format": FORMAT}
            if conf.get("format", FORMAT) != FORMAT:
                raise QuantizationError(f"format '{conf.get('format')}' is not {FORMAT}")
            if weight.dtype != torch.int8 or tuple(weight.shape) != (self.out_features, self.in_features):
                raise QuantizationError(f"expected int8 weight {(self.out_features, self.in_features)}, got "
                                        f"{weight.dtype} {tuple(weight.shape)}")
            rotation = rotation_group_of(conf)
            self.weight = nn.Parameter(cpu_packed(weight.to(self.weight.device)), requires_grad=False)
            self.weight_scale = nn.Parameter(canonical_scale(scale, self.out_features).to(self.weight.device),
                                             requires_grad=False)
            self.rotation_group = rotation
            if bias is not None:
                self.bias = nn.Parameter(bias.to(self.weight.device), requires_grad=False)
            self._padded = self._unpacked = None
        except QuantizationError as exc:
            error_msgs.append(f"{prefix.rstrip('.')}: {exc}")


def int8_report(model: nn.Module) -> dict[str, int]:
    """Counts over a model: int8 layers, their weight bytes, how many hold a prepacked CPU weight,
    and the calls so far that fell back (to a float matmul; from the packed kernel to `_int_mm`)."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    return {
        "int8_layers": len(layers),
        "int8_weight_bytes": sum(m.weight.numel() for m in layers),
        "packed_layers": sum(isinstance(m.weight, int8_onednn.PackedInt8Weight) for m in layers),
        "fallback_calls": sum(m.fallback_calls for m in layers),
        "int_mm_fallback_calls": sum(m.int_mm_fallback_calls for m in layers),
    }
