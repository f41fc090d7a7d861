"""What each Linear layer becomes when a model loads: int8, scaled fp8, or float — and why.

One decision function serves every loader (ComfyUI's operations class, our standalone loader,
the in-memory converter), so a layer is treated the same wherever it is loaded:

1. a pre-quantized int8 layer stays int8 as stored, whatever the exclusion list says;
2. a float layer (an fp8 one is first dequantized *with its scale* — the public packs dropped
   it) is quantized on the fly when asked, unless it is excluded or too thin to gain anything;
3. any other layer stays floating point, in scaled fp8 when an fp8 storage dtype is chosen.

Exclusions match whole module-path components, never raw substrings: `blocks.3` matches
`blocks.3.ffn.0` but not `blocks.35.ffn.0`, and `proj_out` does not match `proj_out_2`. A
component may use shell wildcards (`*_embedder`, `adaln_modulation*`).
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from . import hadamard
from .cast_linear import Fp8Linear
from .fp8 import FP8_FORMAT_OF, dequantize_scaled_fp8, quantize_scaled_fp8
from .int8 import FORMAT, Int8Linear, QuantizationError, canonical_scale, quantize_weight, rotation_group_of
from .precision import is_fp8

FP8_FORMATS = frozenset(FP8_FORMAT_OF.values())


@dataclass(frozen=True)
class ExclusionRules:
    """Module-path patterns whose Linear layers stay float during on-the-fly quantization."""

    patterns: tuple[str, ...] = ()

    @classmethod
    def of(cls, patterns: Iterable[str]) -> ExclusionRules:
        cleaned = []
        for p in patterns:
            p = p.strip().strip(".")
            if not p or any(part == "" for part in p.split(".")):
                raise ValueError(f"exclusion pattern {p!r} is empty or has an empty path component")
            cleaned.append(p)
        return cls(tuple(dict.fromkeys(cleaned)))

    def match(self, path: str) -> str | None:
        """The first pattern whose components occur as a consecutive run in `path`, or None."""
        parts = path.strip(".").split(".")
        for pattern in self.patterns:
            want = pattern.split(".")
            for start in range(len(parts) - len(want) + 1):
                if all(fnmatch.fnmatchcase(parts[start + i], w) for i, w in enumerate(want)):
                    return pattern
        return None

    def union(self, other: ExclusionRules) -> ExclusionRules:
        return ExclusionRules.of(self.patterns + other.patterns)


# ConvRot for on-the-fly layers, in every loader that quantizes float weights: channel outliers in
# real DiT activations cost plain W8A8 ~5x its error; rotation brings it back to the Gaussian floor.
ROTATE_ON_THE_FLY = True


@dataclass(frozen=True)
class QuantPlan:
    """How one load treats its Linear layers (built per load; never shared mutable state)."""

    on_the_fly: bool = False                   # quantize float layers to int8 while loading
    rotation: bool = False                     # ConvRot (Hadamard, group 256) for on-the-fly layers
    exclude: ExclusionRules = ExclusionRules()
    float_storage: torch.dtype | None = None   # fp8 dtype for layers that stay float; None keeps them float
    fp8_fast: bool = False                     # fp8 matmul for those layers where the GPU has it
    fp8_exclude: ExclusionRules = ExclusionRules()   # layers kept in float_dtype instead of float_storage
    work_device: torch.device | None = None    # quantize on this device (e.g. the GPU), store where loaded


@dataclass
class PreparedLinear:
    """One layer's final tensors and the reason it took that form."""

    kind: str                        # "int8" | "fp8" | "float"
    weight: torch.Tensor             # int8 q | fp8 weight | float weight
    scale: torch.Tensor | None       # int8: [] or [N, 1]; fp8: []; float: None
    bias: torch.Tensor | None
    rotation_group: int = 0
    note: str = ""

    def module(self, fp8_fast: bool = False) -> nn.Module | None:
        """An Int8Linear / Fp8Linear holding these tensors (None for float: keep the model's own layer)."""
        if self.kind == "int8":
            return Int8Linear.from_quantized(self.weight, self.scale, self.bias, self.rotation_group)
        if self.kind == "fp8":
            return Fp8Linear(self.weight, self.scale, self.bias, fast=fp8_fast)
        return None


def layer_format(weight: torch.Tensor, scale: torch.Tensor | None, conf: dict | None) -> str:
    """"int8", "fp8" (scaled or plain) or "float" for a canonical layer; anything else is refused."""
    fmt = (conf or {}).get("format")
    if fmt == FORMAT or (fmt is None and weight.dtype == torch.int8):
        if weight.dtype != torch.int8:
            raise QuantizationError(f"comfy_quant says {FORMAT} but the weight is {weight.dtype}")
        if scale is None:
            raise QuantizationError("int8 weight without a weight_scale: the file is incomplete or of an "
                                    "unknown producer")
        return "int8"
    if fmt in FP8_FORMATS or (fmt is None and is_fp8(weight.dtype)):
        if not is_fp8(weight.dtype):
            raise QuantizationError(f"comfy_quant says {fmt} but the weight is {weight.dtype}")
        return "fp8"
    if fmt is not None:
        raise QuantizationError(f"quantization format '{fmt}' is not supported here (supported: {FORMAT}, "
                                f"{', '.join(sorted(FP8_FORMATS))}); load this file with ComfyUI's own loader")
    if not weight.is_floating_point():
        raise QuantizationError(f"weight of dtype {weight.dtype} is neither float, fp8 nor int8")
    return "float"


def prepare_linear(path: str, weight: torch.Tensor, bias: torch.Tensor | None, plan: QuantPlan,
                   float_dtype: torch.dtype, scale: torch.Tensor | None = None,
                   conf: dict | None = None) -> PreparedLinear:
    """Decide and build one Linear's tensors. Errors name the layer and the reason."""
    try:
        return _prepare(path, weight, bias, plan, float_dtype, scale, conf)
    except QuantizationError as exc:
        raise QuantizationError(f"layer '{path}': {exc}") from exc


def _prepare(path, weight, bias, plan, float_dtype, scale, conf) -> PreparedLinear:
    fmt = layer_format(weight, scale, conf)
    if fmt == "int8":
        return PreparedLinear("int8", weight, canonical_scale(scale, weight.shape[0]), bias,
                              rotation_group_of(conf or {}), "pre-quantized")
    reason = _float_reason(path, weight, plan)
    if reason is None:
        source = weight.to(plan.work_device) if plan.work_device is not None else weight
        w = dequantize_scaled_fp8(source, scale) if fmt == "fp8" else source
        group = hadamard.pick_group(w.shape[1]) if plan.rotation else 0
        q, s = quantize_weight(w, per_row=True, rotation_group=group)
        note = "quantized on the fly" + (" from scaled fp8" if fmt == "fp8" else "")
        if plan.rotation:
            note += f", ConvRot {group}" if group else ", no ConvRot (in_features not a multiple of 16)"
        return PreparedLinear("int8", q.to(weight.device), s.to(weight.device), bias, group, note)
    if plan.float_storage is not None and weight.dim() == 2 and plan.fp8_exclude.match(path) is None:
        if fmt == "fp8" and weight.dtype == plan.float_storage:
            kept = scale if scale is not None else torch.ones((), device=weight.device)
            return PreparedLinear("fp8", weight, kept.float().reshape(()), bias, note=reason + "; fp8 as stored")
        w8, s = quantize_scaled_fp8(dequantize_scaled_fp8(weight, scale) if fmt == "fp8" else weight,
                                    plan.float_storage)
        return PreparedLinear("fp8", w8, s, bias, note=reason + "; scaled fp8 storage")
    w = dequantize_scaled_fp8(weight, scale, float_dtype) if fmt == "fp8" else weight.to(float_dtype)
    return PreparedLinear("float", w, None, bias, note=reason)


def main_float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The float dtype holding most of a state dict's float values (fp8 and int8 not counted), or
    None. Layers that stay float are kept in it: "float layers unchanged" in every host."""
    counts: dict[torch.dtype, int] = {}
    for v in tensors.values():
        if v.is_floating_point() and not is_fp8(v.dtype):
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.get) if counts else None


def _float_reason(path: str, weight: torch.Tensor, plan: QuantPlan) -> str | None:
    """Why a float layer stays float, or None when it is to be quantized now."""
    if not plan.on_the_fly:
        return "float in the file (on-the-fly quantization is off)"
    if weight.dim() != 2:
        return f"{weight.dim()}-D weight"
    if 1 in weight.shape:
        return "in or out features of 1"
    pattern = plan.exclude.match(path)
    if pattern is not None:
        return f"excluded by '{pattern}'"
    return None


@dataclass
class QuantReport:
    """What a load did to each Linear, for the node's log line and for tests."""

    entries: dict[str, tuple[str, str]] = field(default_factory=dict)   # path -> (kind, note)
    int8_bytes: int = 0
    other_bytes: int = 0

    def add(self, path: str, prepared: PreparedLinear) -> None:
        self.entries[path] = (prepared.kind, prepared.note)
        size = prepared.weight.numel() * prepared.weight.element_size()
        if prepared.kind == "int8":
            self.int8_bytes += size
        else:
            self.other_bytes += size

    def kinds(self) -> Counter:
        return Counter(kind for kind, _ in self.entries.values())

    def excluded(self) -> dict[str, str]:
        """path -> the pattern that kept it float."""
        return {p: n.split("'")[1] for p, (_, n) in self.entries.items() if n.startswith("excluded by")}

    def summary(self) -> str:
        notes = [n for _, n in self.entries.values()]
        kinds = self.kinds()
        pre = notes.count("pre-quantized")
        otf = sum(1 for n in notes if n.startswith("quantized on the fly"))
        rot = sum(1 for n in notes if ", ConvRot " in n)
        parts = [f"{kinds['int8']} int8 Linear layers ({pre} pre-quantized, {otf} quantized on the fly"
                 + (f", {rot} with ConvRot" if rot else "") + ")"]
        if kinds["fp8"]:
            parts.append(f"{kinds['fp8']} in scaled fp8")
        if kinds["float"]:
            parts.append(f"{kinds['float']} float")
        excluded = self.excluded()
        if excluded:
            parts.append(f"{len(excluded)} excluded by {', '.join(sorted(set(excluded.values())))}")
        return "; ".join(parts) + f"; int8 weights {self.int8_bytes / 2**20:.1f} MiB"


def convert_linears(model: nn.Module, plan: QuantPlan, float_dtype: torch.dtype | None = None,
                    on_layer: Callable[[int, int], None] | None = None) -> QuantReport:
    """Swap a model's nn.Linear layers in place per `plan` (float layers stay the model's own).

    `on_layer(done, total)` is called after each layer so a caller can show progress and honour
    an interrupt between layers.
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    report = QuantReport()
    for done, (name, linear) in enumerate(targets, 1):
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        prepared = prepare_linear(name, weight, bias, plan, float_dtype or weight.dtype)
        report.add(name, prepared)
        replacement = prepared.module(plan.fp8_fast)
        if replacement is not None:
            set_submodule(model, name, replacement)
        if on_layer is not None:
            on_layer(done, len(targets))
    return report


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (nn.Module.set_submodule arrived only in torch 2.5)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
