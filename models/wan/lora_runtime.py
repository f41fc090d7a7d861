"""LoRAs applied while a model runs, never merged: weights stay as loaded, on disk and in RAM.

Why: a strength change should not mean reloading (and re-quantizing) a 14B model, fp8 and int8
layers should keep their storage (merging into them re-rounds every patched weight), and two
workflows should be able to share one loaded model with different LoRAs.

How: `attach_chain` hooks the layers a chain of LoRAs touches and `AttachedLora.remove()`
unhooks them; the sampler attaches for one run and detaches after (so a handle carries only the
recipe, `RuntimeLora`, and the shared module is never changed between runs).

Two modes for Linear-like layers (nn.Linear, fp8 `CastLinear`, int8 `Int8Linear`, GGUF, anything
with in/out_features):

- `EXACT` (default): the layer's forward is replaced, for the run, by one that builds the patched
  weight on every call, W' = (W.float() + s·ΔW) rounded to the weight's dtype, and computes with
  it; W' is dropped when the call ends. On a float model this is bit for bit what merging
  computes (the same fp32 sum, rounded once per LoRA like a chain of merges), so bf16 and fp16
  runs equal merged runs. Quantized layers (fp8, int8, GGUF) are dequantized, patched in fp32
  and computed in the activations' dtype, never requantized: closer to the float model than a
  merge, which re-rounds the patched weight to the storage. Costs one ΔW per call (a small
  matmul beside the layer's own) and a weight-sized scratch tensor while the layer runs; int8
  and `_fast` fp8 layers compute in float while patched.
- `ADDITIVE` (low memory): the layer keeps its own forward and gets `strength · ΔW x` added to
  its output; no weight-sized tensor is ever built. The result differs from a merge by the
  compute dtype's rounding of W + ΔW (≈1e-2 relative in bf16). LoRA runs as two thin matmuls
  and LoKr through `kron_apply`, so neither builds ΔW; LoHa and full `diff`s are dense and are
  built once per run (every call in low-memory mode). DoRA rescales the layer's weight part of
  the output per output row, or its input per column (see models/common/lora_formulas.py);
  its norm is taken once per run from the layer's own (dequantized) weight.
- Everything else (norms, the patch-embedding conv, the blocks' `modulation`) is small: the
  patched tensor is computed from the stored one as the module starts and the stored one is
  put back as it ends (also when it raises).

Adapter tensors stay on the compute device for the run (cached in the compute dtype), outside
the blocks' weights: block swap streams only the base weights, and the LoRA costs its own size
once, not once per slot. `low_mem=True` keeps them in RAM and copies each one as its layer runs
(slower; no VRAM held by the LoRA), in either mode. Attach after block swap's session has started, so a block's
weights are in place before a patch reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..common.lora_formulas import dora_on_output_axis, dora_ratio, dora_weight, kron_apply
from .lora import (
    LoraError,
    LoraPatch,
    LoraReport,
    LoraSet,
    _as_lora_set,
    _check_target,
    _finish,
    _is_quantized,
    block_filter,
    patched_weight,
)

EXACT = "exact"
ADDITIVE = "additive"
MODES = (EXACT, ADDITIVE)


@dataclass(frozen=True, eq=False)
class RuntimeLora:
    """One LoRA of a run-time chain as it travels on a model handle (parsed once, applied per run)."""

    name: str
    lora: LoraSet
    strength: float
    blocks: tuple[int, ...] = ()
    low_mem: bool = False
    mode: str = EXACT

    def __post_init__(self):
        if self.mode not in MODES:
            raise LoraError(f"LoRA mode {self.mode!r} is not one of {', '.join(MODES)}; choose '{EXACT}' (patches "
                            f"the weights per layer call, equals merging) or '{ADDITIVE}' (adds ΔW·x, less memory).")

    def describe(self) -> str:
        where = f" blocks {','.join(map(str, self.blocks))}" if self.blocks else ""
        return f"{self.name}:{self.strength:g}{where} (unmerged, {self.mode}{', low-mem' if self.low_mem else ''})"

    def device_bytes(self) -> int:
        """What this LoRA keeps on the compute device for a run: its tensors (fp32 in exact mode,
        which builds ΔW in fp32; at most that in additive mode); none when `low_mem`."""
        if self.low_mem:
            return 0
        total = 0
        for patch in self.lora.patches.values():
            tensors = [patch.down, patch.up, patch.diff, patch.diff_b, patch.dora_scale, *patch.factors.values()]
            total += sum(4 * t.numel() for t in tensors if t is not None)
        return total


def chain_device_bytes(chain: Sequence[RuntimeLora], model: nn.Module) -> int:
    """VRAM a run-time chain adds while sampling: the LoRAs' own tensors plus, when a LoRA runs
    exact, the scratch of patching the largest Linear (its fp32 weight, ΔW and the rounded copy)."""
    total = sum(item.device_bytes() for item in chain)
    if any(item.mode == EXACT for item in chain):
        largest = max((m.in_features * m.out_features for m in model.modules() if _is_linear_like(m)), default=0)
        total += 10 * largest
    return total


@dataclass
class AttachedLora:
    """The hooks of attached LoRAs; `remove()` detaches every one and drops their device copies."""

    reports: list[LoraReport] = field(default_factory=list)
    handles: list = field(default_factory=list)
    layers: list = field(default_factory=list)

    @property
    def report(self) -> LoraReport:
        return self.reports[0]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for layer in self.layers:
            layer.release()
        self.handles.clear()
        self.layers.clear()

    def __enter__(self) -> AttachedLora:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class _Entry:
    patch: LoraPatch
    strength: float
    low_mem: bool
    mode: str = EXACT


def _is_linear_like(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features") and \
        not isinstance(module, nn.modules.conv._ConvNd)


class _TensorCache:
    """Adapter tensors on the activations' device and dtype: kept for the run, or fetched per call."""

    def __init__(self):
        self.cache: dict[tuple, torch.Tensor] = {}

    def get(self, key, make: Callable[[], torch.Tensor], like: torch.Tensor, low_mem: bool) -> torch.Tensor:
        if low_mem:
            return make().to(device=like.device, dtype=like.dtype)
        full = (key, like.device, like.dtype)
        if full not in self.cache:
            self.cache[full] = make().to(device=like.device, dtype=like.dtype)
        return self.cache[full]

    def release(self) -> None:
        self.cache.clear()


class _LinearAdapters(_TensorCache):
    """Every run-time patch of one Linear-like layer, applied in chain order to its output."""

    def __init__(self, module: nn.Module, entries: list[_Entry]):
        super().__init__()
        self.module = module
        self.entries = entries
        self.ratios: list[torch.Tensor | None] | None = None   # DoRA m/‖W'‖ per entry, once per run
        self.inputs: list[torch.Tensor] = []
        self.input_dora = entries[0].patch.dora_scale is not None and \
            not dora_on_output_axis(entries[0].patch.dora_scale, module.out_features)
        for entry in entries[1:]:
            if entry.patch.dora_scale is not None and not dora_on_output_axis(entry.patch.dora_scale,
                                                                               module.out_features):
                raise LoraError(f"{entry.patch.target}: a DoRA LoRA that normalises input columns follows another "
                                "LoRA on this layer, which additive mode cannot run; set Wan Apply LoRA's lora_mode "
                                "'exact', put it first in the chain, or merge the LoRAs at load (Wan Model Loader's "
                                "'lora' input).")

    def release(self) -> None:
        super().release()
        self.ratios = None
        self.inputs.clear()

    # ---------------------------------------------------------------- pieces
    def _delta_x(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """ΔW x of one entry (scale applied, strength not) in x's dtype."""
        entry = self.entries[index]
        patch = entry.patch
        family = patch.family
        out = None
        if family == "lora":
            down = self.get((index, "down"), lambda: patch.down.flatten(1), x, entry.low_mem)
            up = self.get((index, "up"), lambda: patch.up.flatten(1), x, entry.low_mem)
            out = (x @ down.t()) @ up.t() * patch.scale
        elif family == "lokr":
            w1 = self.get((index, "w1"), lambda: patch.lokr_factors()[0], x, entry.low_mem)
            w2 = self.get((index, "w2"), lambda: patch.lokr_factors()[1], x, entry.low_mem)
            out = kron_apply(x, w1, w2) * patch.scale
        elif family == "loha":
            delta = self.get((index, "loha"), lambda: patch.family_delta(), x, entry.low_mem)
            out = x @ delta.t()
        if patch.diff is not None:
            diff = self.get((index, "diff"), lambda: patch.diff, x, entry.low_mem)
            out = x @ diff.t() if out is None else out + x @ diff.t()
        return out

    def _dora_ratios(self, device: torch.device) -> list[torch.Tensor | None]:
        """m / ‖W_prev + ΔW‖ for each DoRA entry, W_prev being the weight with the earlier entries in."""
        if self.ratios is None:
            module = self.module
            weight = module.dequantize(torch.float32) if _is_quantized(module) else module.weight.float()
            weight = weight.to(device).flatten(1)
            ratios: list[torch.Tensor | None] = []
            for entry in self.entries:
                patch = entry.patch
                delta = patch.weight_delta(1.0, device)
                if patch.dora_scale is None:
                    ratios.append(None)
                    weight = weight if delta is None else weight + entry.strength * delta
                    continue
                magnitude = patch.dora_scale.to(device)
                ratios.append(dora_ratio(weight, delta, magnitude).reshape(-1))
                weight = dora_weight(weight, delta, magnitude, entry.strength)
            self.ratios = ratios
        return self.ratios

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        s = self._dora_ratios(x.device)[0]
        strength = self.entries[0].strength
        return (1.0 - strength + strength * s).to(x.dtype)

    # ---------------------------------------------------------------- hooks
    def pre(self, module, args):
        """Input-axis DoRA first on the layer: the base layer sees x scaled per column."""
        x = args[0]
        self.inputs.append(x)
        return (x * self._input_scale(x), *args[1:])

    def post(self, module, args, output):
        x = self.inputs.pop() if self.input_dora else args[0]
        ratios = self._dora_ratios(x.device) if any(e.patch.dora_scale is not None for e in self.entries) else None
        if ratios is None:
            for index, entry in enumerate(self.entries):
                delta = self._delta_x(index, x)
                if delta is not None:
                    output = output + entry.strength * delta
                if entry.patch.diff_b is not None:
                    output = output + entry.strength * self.get((index, "diff_b"), lambda e=entry: e.patch.diff_b,
                                                                output, entry.low_mem)
            return output
        bias = module.bias.to(output.dtype) if getattr(module, "bias", None) is not None else None
        weight_part = output if bias is None else output - bias
        bias_part = bias
        for index, entry in enumerate(self.entries):
            strength = entry.strength
            ratio = ratios[index]
            if ratio is not None and index == 0 and self.input_dora:
                weight_part = weight_part + strength * self._delta_x(index, x * ratio.to(x.dtype))
            elif ratio is not None:
                r = ratio.to(output.dtype)
                weight_part = (1.0 - strength + strength * r) * weight_part + strength * r * self._delta_x(index, x)
            else:
                delta = self._delta_x(index, x)
                if delta is not None:
                    weight_part = weight_part + strength * delta
            if entry.patch.diff_b is not None:
                extra = strength * self.get((index, "diff_b"), lambda e=entry: e.patch.diff_b, output, entry.low_mem)
                bias_part = extra if bias_part is None else bias_part + extra
        return weight_part if bias_part is None else weight_part + bias_part


class _ExactLinear:
    """Exact mode for one Linear-like layer: its forward, for the run, computes with W' = W + Σ s·ΔW
    built on each call (see the module docstring); `remove()` gives the layer its own forward back."""

    def __init__(self, module: nn.Module, entries: list[_Entry]):
        self.module = module
        self.entries = entries
        self.quantized = _is_quantized(module)
        self.patches: dict[tuple[int, torch.device], LoraPatch] = {}
        self.own_forward = module.__dict__.get("forward")
        module.forward = self.forward

    def _patch(self, index: int, device: torch.device) -> LoraPatch:
        entry = self.entries[index]
        if entry.low_mem:
            return entry.patch.to(device)
        key = (index, device)
        if key not in self.patches:
            self.patches[key] = entry.patch.to(device)
        return self.patches[key]

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The patched weight in `dtype`. Float storage: rounded to the storage dtype after each LoRA,
        as merging them one by one does; quantized storage: summed in fp32, rounded once to `dtype`."""
        module = self.module
        if self.quantized:
            weight = module.dequantize(torch.float32)
            storage = torch.float32
        else:
            weight = module.weight
            storage = weight.dtype
        for index, entry in enumerate(self.entries):
            patch = entry.patch
            if patch.family is None and patch.diff is None:
                continue
            weight = patched_weight(weight.float(), self._patch(index, weight.device), entry.strength).to(storage)
        return weight.to(dtype)

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        bias = getattr(self.module, "bias", None)
        if bias is None:
            return None
        for index, entry in enumerate(self.entries):
            if entry.patch.diff_b is not None:
                diff_b = self._patch(index, bias.device).diff_b
                bias = (bias.float() + diff_b.float() * entry.strength).to(bias.dtype)
        return bias.to(dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return F.linear(x, self.weight(x.dtype), self.bias(x.dtype))

    def release(self) -> None:
        if self.module.__dict__.get("forward") == self.forward:
            if self.own_forward is None:
                del self.module.forward
            else:
                self.module.forward = self.own_forward
        self.patches.clear()


class _ParamPatch(_TensorCache):
    """Run-time patches of one small tensor (a norm's gain, a conv weight, a modulation table):
    swapped in as its module starts, the stored tensor put back as it ends."""

    def __init__(self, owner: nn.Module, name: str, entries: list[tuple[_Entry, Callable[[], torch.Tensor | None]]]):
        super().__init__()
        self.owner = owner
        self.name = name
        self.entries = entries
        self.stored: list[torch.Tensor] = []

    def pre(self, module, args):
        stored = module._parameters[self.name]
        self.stored.append(stored)
        value = stored.detach()
        for index, (entry, delta_of) in enumerate(self.entries):   # rounded per LoRA, as merging them is
            wide = value.float()
            delta = self.get(index, lambda d=delta_of: d(), wide, entry.low_mem).view_as(wide)
            if entry.patch.dora_scale is not None and self.name == "weight":
                magnitude = entry.patch.dora_scale.to(wide.device)
                value = dora_weight(wide, delta, magnitude, entry.strength).to(stored.dtype)
            else:
                value = (wide + entry.strength * delta).to(stored.dtype)
        module._parameters[self.name] = nn.Parameter(value, requires_grad=False)

    def post(self, module, args, output):
        if self.stored:
            module._parameters[self.name] = self.stored.pop()

    def release(self) -> None:
        super().release()
        while self.stored:   # a forward that never ended (interrupted) still gets its tensor back
            self.owner._parameters[self.name] = self.stored.pop()


def _param_targets(model: nn.Module, target: str, module: nn.Module | None, patch: LoraPatch):
    """(owner, parameter name, ΔW maker) pairs for a patch applied by swapping tensors."""
    if module is None:   # a bare parameter
        owner_name, _, name = target.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        return [(owner, name, lambda: patch.diff.float())]
    pairs = []
    if patch.family is not None or patch.diff is not None:
        pairs.append((module, "weight", lambda: patch.weight_delta(1.0)))
    if patch.diff_b is not None:
        pairs.append((module, "bias", lambda: patch.diff_b.float()))
    return pairs


def attach_chain(model: nn.Module, chain: Sequence[RuntimeLora]) -> AttachedLora:
    """Hook every layer the chain's LoRAs touch (in chain order); see the module docstring."""
    image_model = any("k_img" in name for name, _ in model.named_modules())
    attached = AttachedLora()
    linear: dict[int, tuple[nn.Module, list[_Entry]]] = {}
    params: dict[tuple[int, str], tuple[nn.Module, str, list]] = {}
    try:
        for item in chain:
            skip = block_filter(model, item.blocks)
            report = LoraReport()
            for target, patch in item.lora.patches.items():
                reason = None if skip is None else skip(target)
                module = param = None
                if reason is None:
                    module, param, reason = _check_target(model, patch, image_model)
                if reason is not None:
                    report.skipped[target] = reason
                    continue
                entry = _Entry(patch, float(item.strength), item.low_mem, item.mode)
                if module is not None and _is_linear_like(module):
                    linear.setdefault(id(module), (module, []))[1].append(entry)
                else:
                    for owner, name, delta_of in _param_targets(model, target, module, patch):
                        params.setdefault((id(owner), name), (owner, name, []))[2].append((entry, delta_of))
                report.applied.append(target)
            attached.reports.append(_finish(report, item.lora))
        for module, entries in linear.values():
            if any(entry.mode == EXACT for entry in entries):   # one exact LoRA: the whole layer runs exact
                attached.layers.append(_ExactLinear(module, entries))
                continue
            layer = _LinearAdapters(module, entries)
            attached.layers.append(layer)
            if layer.input_dora:
                attached.handles.append(module.register_forward_pre_hook(layer.pre))
            attached.handles.append(module.register_forward_hook(layer.post))
        for owner, name, entries in params.values():
            layer = _ParamPatch(owner, name, entries)
            attached.layers.append(layer)
            attached.handles.append(owner.register_forward_pre_hook(layer.pre))
            attached.handles.append(owner.register_forward_hook(layer.post, prepend=True, always_call=True))
    except LoraError:
        attached.remove()
        raise
    return attached


def attach_lora(model: nn.Module, lora: LoraSet | Mapping[str, torch.Tensor], strength: float = 1.0,
                blocks: tuple[int, ...] = (), low_mem: bool = False, mode: str = EXACT) -> AttachedLora:
    """Attach one LoRA (a state dict or a parsed `LoraSet`) at `strength`; `remove()` detaches it."""
    return attach_chain(model, [RuntimeLora("lora", _as_lora_set(lora, model), strength, blocks, low_mem, mode)])
