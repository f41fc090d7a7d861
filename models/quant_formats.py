"""Quantized checkpoint dialects in, one canonical layout out; and the official int8 layout written.

Files in the wild carry int8 and fp8 layers in several dialects. Every loader
of ours first turns a state dict into the canonical layout, so the per-layer code sees only:

* int8 layer  — `P.weight` I8 [N, K], `P.weight_scale` F32 `[]` or `[N, 1]`, `P.comfy_quant`
  = {"format": "int8_tensorwise"[, "convrot": true, "convrot_groupsize": g]};
* fp8 layer   — `P.weight` F8, `P.weight_scale` F32 `[]` (1.0 for plain-cast files),
  `P.comfy_quant` = {"format": "float8_e4m3fn" | "float8_e5m2"};
* anything else unchanged.

Read: ComfyUI's per-layer `comfy_quant` (ConvRot flags top-level or under "params"), the
whole-file `_quantization_metadata` header, legacy `scaled_fp8` files (`scale_weight`), the older
int8 packs (int8 + `weight_scale` with no or a format-less `comfy_quant`, `quarot` flags), and
explicit-Hadamard int8 layers (`quarot_hadamard`, optional `hadanorm_sigma`), which are
dequantized to fp32 because no runtime here rotates with an arbitrary matrix. Input scales are
dropped: activations are quantized per token at run time. Anything ambiguous is refused by name.

Written: exactly what ComfyUI's own `UNETLoader` reads.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..kernels import hadamard
from ..kernels.fp8 import FP8_FORMAT_OF, fp8_comfy_quant_config
from ..kernels.int8 import (
    FORMAT,
    QuantizationError,
    canonical_scale,
    comfy_quant_config,
    decode_comfy_quant,
    encode_comfy_quant,
)
from ..kernels.precision import is_fp8
from .checkpoint import CheckpointError

_DROPPED_SUFFIXES = (".input_scale", ".scale_input")
_UNSUPPORTED_HINT = ("load it with ComfyUI's own 'Load Diffusion Model' node, or convert it to bf16 and "
                     "quantize it on the fly")


class QuantFormatError(CheckpointError):
    """A quantized layer in a dialect we cannot read faithfully."""


@dataclass
class FormatReport:
    """What normalization found: layers per format and what it had to drop or convert."""

    formats: Counter = field(default_factory=Counter)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def prequantized(self) -> bool:
        return self.formats[FORMAT] > 0

    def summary(self) -> str:
        if not self.formats:
            return "float checkpoint"
        parts = [f"{n} {fmt}" for fmt, n in sorted(self.formats.items())]
        text = "quantized layers in the file: " + ", ".join(parts)
        if self.dropped:
            text += f"; ignored {len(self.dropped)} input scale(s) (activations are scaled per token)"
        return text + "".join(f"; {n}" for n in self.notes)


def normalize(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
              ) -> tuple[dict[str, torch.Tensor], FormatReport]:
    """The canonical layout of a state dict (see module docstring) and a report of what was found."""
    out = dict(sd)
    report = FormatReport()
    _apply_header_metadata(out, metadata or {})
    _convert_legacy_scaled_fp8(out, report)
    for key in [k for k in out if k.endswith(_DROPPED_SUFFIXES)]:
        report.dropped.append(key)
        del out[key]
    for layer in sorted({k[: -len(".weight")] for k in out if k.endswith(".weight")}):
        try:
            _normalize_layer(out, layer, report)
        except QuantizationError as exc:
            raise QuantFormatError(f"layer '{layer}': {exc}") from exc
    orphans = [k for k in out if k.endswith((".weight_scale", ".comfy_quant")) and
               k.rsplit(".", 1)[0] + ".weight" not in out]
    if orphans:
        raise QuantFormatError(f"scale or comfy_quant tensor(s) without a weight: {', '.join(orphans[:5])}. "
                               "The file is incomplete.")
    return out, report


def _apply_header_metadata(sd: dict, metadata: Mapping[str, str]) -> None:
    """`_quantization_metadata` = {"layers": {name: {"format": …} | "format"}} → per-layer comfy_quant."""
    raw = metadata.get("_quantization_metadata")
    if not raw:
        return
    try:
        layers = json.loads(raw)["layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise QuantFormatError(f"the file's _quantization_metadata header is not valid ({exc}).") from exc
    for name, conf in layers.items():
        conf = {"format": conf} if isinstance(conf, str) else dict(conf)
        key = f"{name}.comfy_quant"
        if key not in sd:
            sd[key] = encode_comfy_quant(conf)


def _convert_legacy_scaled_fp8(sd: dict, report: FormatReport) -> None:
    """Legacy `scaled_fp8` marker + `P.scale_weight` → canonical fp8 layers (as comfy.utils does)."""
    markers = [k for k in sd if k == "scaled_fp8" or k.endswith(".scaled_fp8")]
    for marker in markers:
        del sd[marker]
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        layer = key[: -len(".scale_weight")]
        sd[f"{layer}.weight_scale"] = sd.pop(key)
        weight = sd.get(f"{layer}.weight")
        fmt = FP8_FORMAT_OF.get(getattr(weight, "dtype", None), "float8_e4m3fn")
        sd.setdefault(f"{layer}.comfy_quant", encode_comfy_quant({"format": fmt}))
    if markers:
        report.notes.append("legacy scaled_fp8 file")


def _rotation_of(conf: dict) -> int:
    """ConvRot group from any dialect: top-level or under "params"; `quarot` spelled like convrot."""
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    for source in (conf, params):
        for flag, size in (("convrot", "convrot_groupsize"), ("quarot", "quarot_groupsize")):
            if source.get(flag):
                group = int(source.get(size, hadamard.DEFAULT_GROUP))
                if not hadamard.is_valid_group(group):
                    raise QuantizationError(f"{flag} group size {group} is not a power of 4")
                return group
    return 0


def _normalize_layer(sd: dict, layer: str, report: FormatReport) -> None:
    weight = sd[f"{layer}.weight"]
    scale = sd.get(f"{layer}.weight_scale")
    conf_t = sd.get(f"{layer}.comfy_quant")
    conf = decode_comfy_quant(conf_t) if conf_t is not None else None
    explicit_h = sd.pop(f"{layer}.quarot_hadamard", None)
    sigma = sd.pop(f"{layer}.hadanorm_sigma", None)
    fmt = (conf or {}).get("format")
    if weight.dtype == torch.int8:
        if fmt not in (None, FORMAT):
            raise QuantizationError(f"format '{fmt}' stores int8 data this loader cannot run; {_UNSUPPORTED_HINT}")
        if scale is None:
            raise QuantizationError("int8 weight without weight_scale — cannot know its scale")
        if weight.dim() != 2:
            raise QuantizationError(f"{weight.dim()}-D int8 weight (a MoE bank or blockwise layout); "
                                    f"{_UNSUPPORTED_HINT}")
        scale = canonical_scale(scale, weight.shape[0])
        if explicit_h is not None:
            sd[f"{layer}.weight"] = _undo_explicit_rotation(weight, scale, explicit_h, sigma)
            sd.pop(f"{layer}.weight_scale")
            sd.pop(f"{layer}.comfy_quant", None)
            report.formats["int8 (explicit Hadamard, dequantized to fp32)"] += 1
            return
        group = _rotation_of(conf or {})
        if group and weight.shape[1] % group:
            raise QuantizationError(f"ConvRot group {group} does not divide {weight.shape[1]} input channels")
        sd[f"{layer}.weight_scale"] = scale
        sd[f"{layer}.comfy_quant"] = encode_comfy_quant(comfy_quant_config(group))
        report.formats[FORMAT] += 1
        return
    if is_fp8(weight.dtype):
        expected = FP8_FORMAT_OF[weight.dtype]
        if fmt not in (None, expected):
            raise QuantizationError(f"comfy_quant says '{fmt}' but the weight is {weight.dtype}")
        if scale is not None and scale.numel() != 1:
            raise QuantizationError(f"fp8 weight with a {tuple(scale.shape)} scale (row- or blockwise fp8); "
                                    f"{_UNSUPPORTED_HINT}")
        sd[f"{layer}.weight_scale"] = (scale if scale is not None else torch.ones(())).float().reshape(())
        sd[f"{layer}.comfy_quant"] = encode_comfy_quant(fp8_comfy_quant_config(weight.dtype))
        report.formats[expected + (" (scaled)" if scale is not None else " (plain cast)")] += 1
        return
    if fmt is not None:
        raise QuantizationError(f"comfy_quant format '{fmt}' with a {weight.dtype} weight is not supported; "
                                f"{_UNSUPPORTED_HINT}")
    if scale is not None:
        raise QuantizationError(f"a {weight.dtype} weight with a weight_scale: unknown dialect")


def _undo_explicit_rotation(q: torch.Tensor, scale: torch.Tensor, h: torch.Tensor,
                            sigma: torch.Tensor | None) -> torch.Tensor:
    """fp32 weight of a layer stored as int8(rot(W·σ)) with an explicit Hadamard H (Sparknight files)."""
    w = q.float() * scale
    g = h.shape[0]
    if h.dim() != 2 or h.shape[1] != g or w.shape[1] % g:
        raise QuantizationError(f"explicit Hadamard of shape {tuple(h.shape)} does not fit {tuple(w.shape)}")
    hf = h.float()
    hf = hf / hf[0].norm()  # files store H either orthonormal (±1/√g) or as ±1
    w = (w.reshape(-1, g) @ hf).reshape(w.shape)  # W_rot = W·Hᵀ per group  ⇒  W = W_rot·H (H orthogonal)
    if sigma is not None:
        w = w / sigma.float().reshape(1, -1)
    return w


def file_metadata(model_type: str, report_summary: str) -> dict[str, str]:
    """safetensors __metadata__ for a saved int8 file: who made it and what it holds (strings only)."""
    return {"format": "pt", "slipstream_int8": "1", "slipstream_model_type": model_type,
            "slipstream_layers": report_summary}
