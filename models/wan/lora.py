"""Wan 2.1 LoRAs in the key formats people share, applied to a loaded WanDiT at a strength.

Formats understood (all reduce to a module path of the official DiT + a kind of tensor):
- ComfyUI / diffusion-pipe / musubi: `diffusion_model.blocks.N.self_attn.q.lora_A.weight`, `lora_B`,
  `.alpha`; also `lora_down`/`lora_up`, `lora.down`/`lora.up`, and PEFT's `.lora_A.default.weight`.
- Prefixes `diffusion_model.`, `model.diffusion_model.`, `transformer.`, `pipe.dit.`,
  `base_model.model.`, `model.`, or none.
- kohya / LyCORIS LoCon: `lora_unet_blocks_0_self_attn_q.lora_down.weight` (`lora_unet__…`,
  `lycoris_…`): underscores are resolved against the model's own module names.
- Diffusers / finetrainers names: `blocks.N.attn1.to_q` (self-attention), `attn2.to_k` (cross),
  `attn2.add_k_proj` (k_img), `ffn.net.0.proj`, `condition_embedder.*`, `proj_out`, ….
- Full differences: `<module>.diff` (weight) and `<module>.diff_b` (bias), e.g. in distillation
  LoRAs that also touch norms; a `diff` on a bare parameter (`blocks.N.modulation.diff`) too.

Two ways to apply, neither keeps a second copy of the model:
- `merge_lora(model, lora, strength)` adds `strength · alpha/rank · up @ down` to each weight in
  place. Float layers are updated directly (in fp32, rounded once to their dtype); any layer with
  a `dequantize()`/`requantize(weight)` pair (fp8 `CastLinear`, int8 `Int8Linear`) is
  dequantized, patched and requantized one layer at a time. Merging `-strength` undoes it (exact
  up to the storage dtype's rounding).
- `attach_lora(model, lora, strength)` leaves the weights alone and adds the low-rank product to
  each layer's output through forward hooks (lossless on quantized layers, reversible exactly);
  `handle.remove()` detaches it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import CheckpointError

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "pipe.dit.",
            "model.")
KOHYA_PREFIXES = ("lora_unet__", "lora_unet_", "lycoris_")
# key ending -> kind; checked in order, longest first where they overlap.
KINDS = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
)
UNSUPPORTED = (".lora_mid.weight", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w2",
               ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".hada_t1", ".hada_t2", ".lokr_t2",
               ".dora_scale", ".w_norm", ".b_norm")
# Diffusers/finetrainers module names -> official ones (applied to the dotted module path).
DIFFUSERS_RENAMES = (
    (r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q$", ".q"), (r"\.to_k$", ".k"), (r"\.to_v$", ".v"), (r"\.to_out\.0$", ".o"),
    (r"\.add_k_proj$", ".k_img"), (r"\.add_v_proj$", ".v_img"), (r"\.norm_added_k$", ".norm_k_img"),
    (r"\.ffn\.net\.0\.proj$", ".ffn.0"), (r"\.ffn\.net\.2$", ".ffn.2"),
    (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
    (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj$", "img_emb.proj.1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2$", "img_emb.proj.3"),
    (r"^proj_out$", "head.head"),
)
_IMAGE_ONLY = ("k_img", "v_img", "norm_k_img", "img_emb")


class LoraError(CheckpointError):
    """A LoRA that cannot be applied to this model at all."""


@dataclass
class LoraPatch:
    """Everything one LoRA file holds for one module (or bare parameter) of the DiT."""

    target: str
    down: torch.Tensor | None = None      # [rank, in]  (lora_A / lora_down)
    up: torch.Tensor | None = None        # [out, rank] (lora_B / lora_up)
    alpha: float | None = None
    diff: torch.Tensor | None = None      # full weight difference
    diff_b: torch.Tensor | None = None    # bias difference

    @property
    def scale(self) -> float:
        """alpha / rank (1 without alpha)."""
        if self.alpha is None or self.down is None:
            return 1.0
        return self.alpha / self.down.shape[0]

    def weight_delta(self, strength: float, device=None) -> torch.Tensor | None:
        """strength · (scale · up @ down + diff) in fp32, or None if this patch has no weight part."""
        delta = None
        if self.down is not None and self.up is not None:
            up = self.up.to(device=device, dtype=torch.float32).flatten(1)
            down = self.down.to(device=device, dtype=torch.float32).flatten(1)
            delta = (up @ down) * self.scale
        if self.diff is not None:
            diff = self.diff.to(device=device, dtype=torch.float32)
            delta = diff if delta is None else delta + diff
        return None if delta is None else delta * strength


@dataclass
class LoraSet:
    """A parsed LoRA file: patches by official target name, and keys that were not understood."""

    patches: dict[str, LoraPatch]
    unknown: list[str] = field(default_factory=list)


@dataclass
class LoraReport:
    """What `merge_lora`/`attach_lora` did: targets patched, and targets skipped with the reason."""

    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"LoRA: {len(self.applied)} layer(s) patched"
        if self.skipped:
            reasons: dict[str, int] = {}
            for reason in self.skipped.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            text += "; skipped " + "; ".join(f"{n} ({r})" for r, n in reasons.items())
        if self.unknown:
            text += f"; {len(self.unknown)} key(s) not understood, e.g. {self.unknown[0]}"
        return text


def _split_kind(key: str) -> tuple[str, str] | None:
    for suffix, kind in KINDS:
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def _official_path(base: str, kohya_names: Mapping[str, str]) -> str | None:
    """The official module path of a LoRA key's base, or None if it names nothing we know."""
    for prefix in KOHYA_PREFIXES:
        if base.startswith(prefix):
            return kohya_names.get(base[len(prefix):])
    for prefix in PREFIXES:
        if base.startswith(prefix):
            base = base[len(prefix):]
            break
    for pattern, repl in DIFFUSERS_RENAMES:
        base = re.sub(pattern, repl, base)
    return base


def _kohya_names(model: nn.Module) -> dict[str, str]:
    """kohya flattens module paths with underscores; map each flattened name back."""
    names = {name.replace(".", "_"): name for name, _ in model.named_modules() if name}
    names.update({name.replace(".", "_"): name for name, _ in model.named_parameters()})
    return names


def parse_lora(sd: Mapping[str, torch.Tensor], model: nn.Module) -> LoraSet:
    """Group a LoRA state dict by the official module (or parameter) each key targets."""
    kohya = _kohya_names(model)
    patches: dict[str, LoraPatch] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        split = _split_kind(key)
        target = _official_path(split[0], kohya) if split else None
        if split is None or target is None or key.endswith(UNSUPPORTED):
            unknown.append(key)
            continue
        patch = patches.setdefault(target, LoraPatch(target))
        kind = split[1]
        if kind == "alpha":
            patch.alpha = float(tensor.float().reshape(-1)[0])
        else:
            setattr(patch, kind, tensor)
    return LoraSet(patches, unknown)


def _resolve(model: nn.Module, target: str) -> tuple[nn.Module | None, torch.Tensor | None]:
    """(module, None) for a module path, (None, parameter) for a bare parameter, (None, None) if absent."""
    try:
        return model.get_submodule(target), None
    except AttributeError:
        pass
    try:
        return None, model.get_parameter(target)
    except AttributeError:
        return None, None


def _is_quantized(module: nn.Module) -> bool:
    """A layer whose stored weight is not what it computes with: it must be patched through its
    dequantize/requantize pair (fp8 CastLinear, int8 Int8Linear, …)."""
    weight = getattr(module, "weight", None)
    has_pair = callable(getattr(module, "dequantize", None)) and callable(getattr(module, "requantize", None))
    if not has_pair:
        return False
    return weight is None or not weight.is_floating_point() or weight.element_size() == 1 or \
        getattr(module, "weight_scale", None) is not None


def _weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    if _is_quantized(module) and hasattr(module, "out_features"):
        return (module.out_features, module.in_features)
    weight = getattr(module, "weight", None)
    return None if weight is None else tuple(weight.shape)


def _check_target(model: nn.Module, patch: LoraPatch, image_model: bool) -> tuple[nn.Module | None,
                                                                                  torch.Tensor | None, str | None]:
    module, param = _resolve(model, patch.target)
    if module is None and param is None:
        if not image_model and any(part in patch.target.split(".") for part in _IMAGE_ONLY):
            return None, None, "image-to-video layer; this is a text-to-video model"
        return None, None, "no such layer in this model"
    if param is not None:
        if patch.diff is None or patch.down is not None:
            return None, None, "only a full 'diff' can patch a bare parameter"
        if tuple(patch.diff.shape) != tuple(param.shape):
            return None, None, f"shape {tuple(patch.diff.shape)} does not fit {tuple(param.shape)}"
        return None, param, None
    if (patch.down is None) != (patch.up is None):
        return None, None, "lora_A/down without lora_B/up (or the reverse)"
    want = _weight_shape(module)
    if patch.down is not None:
        # conv LoRAs flatten to [out, in·k] like the weight they patch
        got = (patch.up.shape[0], math.prod(patch.down.shape[1:]))
        if want is None or got != (want[0], math.prod(want[1:])) or patch.up.flatten(1).shape[1] != patch.down.shape[0]:
            return None, None, (f"LoRA shape {got} does not fit the layer's weight {want} "
                                "(made for another model size?)")
    elif patch.diff is not None and (want is None or tuple(patch.diff.shape) != want):
        return None, None, f"diff shape {tuple(patch.diff.shape)} does not fit the layer's weight {want}"
    if patch.diff_b is not None:
        bias = getattr(module, "bias", None)
        if bias is None or tuple(bias.shape) != tuple(patch.diff_b.shape):
            return None, None, "bias difference does not fit the layer's bias"
    return module, None, None


def _finish(report: LoraReport, lora: LoraSet) -> LoraReport:
    report.unknown = list(lora.unknown)
    if not report.applied:
        examples = [f"{k} ({v})" for k, v in list(report.skipped.items())[:2]] or lora.unknown[:2]
        raise LoraError("This LoRA does not apply to this model: no layer matched. Examples: "
                        f"{'; '.join(examples) or 'the file holds no tensors'}. Check that it was made for this "
                        "Wan 2.1 model (1.3B vs 14B, t2v vs i2v).")
    return report


def _as_lora_set(lora: LoraSet | Mapping[str, torch.Tensor], model: nn.Module) -> LoraSet:
    return lora if isinstance(lora, LoraSet) else parse_lora(lora, model)


@torch.no_grad()
def merge_lora(model: nn.Module, lora: LoraSet | Mapping[str, torch.Tensor], strength: float = 1.0) -> LoraReport:
    """Add a LoRA into the model's weights in place (see the module docstring)."""
    lora = _as_lora_set(lora, model)
    image_model = any("k_img" in name for name, _ in model.named_modules())
    report = LoraReport()
    for target, patch in lora.patches.items():
        module, param, reason = _check_target(model, patch, image_model)
        if reason is not None:
            report.skipped[target] = reason
            continue
        if param is not None:
            param.copy_((param.float() + patch.diff.to(param.device, torch.float32) * strength).to(param.dtype))
            report.applied.append(target)
            continue
        _merge_into(module, patch, strength)
        report.applied.append(target)
    return _finish(report, lora)


def _merge_into(module: nn.Module, patch: LoraPatch, strength: float) -> None:
    if patch.down is not None or patch.diff is not None:
        if _is_quantized(module):
            weight = module.dequantize(torch.float32)
            module.requantize(weight + patch.weight_delta(strength, weight.device).view_as(weight))
        else:
            weight = module.weight
            delta = patch.weight_delta(strength, weight.device).view_as(weight)
            weight.copy_((weight.float() + delta).to(weight.dtype))
    if patch.diff_b is not None:
        bias = module.bias
        bias.copy_((bias.float() + patch.diff_b.to(bias.device, torch.float32) * strength).to(bias.dtype))


@dataclass
class AttachedLora:
    """Forward hooks that add a LoRA to layer outputs; `remove()` detaches every one of them."""

    report: LoraReport
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def attach_lora(model: nn.Module, lora: LoraSet | Mapping[str, torch.Tensor], strength: float = 1.0) -> AttachedLora:
    """Apply a LoRA at run time through forward hooks on Linear-like layers (weights untouched).

    Only low-rank pairs on layers that take [..., in_features] inputs can run this way; `diff`
    patches and conv LoRAs need `merge_lora` and are reported as skipped.
    """
    lora = _as_lora_set(lora, model)
    image_model = any("k_img" in name for name, _ in model.named_modules())
    report = LoraReport()
    attached = AttachedLora(report)
    for target, patch in lora.patches.items():
        module, _, reason = _check_target(model, patch, image_model)
        if reason is None and (module is None or patch.down is None or patch.diff is not None
                               or patch.diff_b is not None or patch.down.dim() != 2):
            reason = "only low-rank Linear patches can be attached; merge this LoRA instead"
        if reason is not None:
            report.skipped[target] = reason
            continue
        attached.handles.append(module.register_forward_hook(_lora_hook(patch, strength)))
        report.applied.append(target)
    try:
        _finish(report, lora)
    except LoraError:
        attached.remove()
        raise
    return attached


def _lora_hook(patch: LoraPatch, strength: float):
    factor = strength * patch.scale
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, args, output):
        x = args[0]
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (patch.down.to(device=x.device, dtype=x.dtype), patch.up.to(device=x.device, dtype=x.dtype))
        down, up = cache[key]
        return output + (x @ down.t() @ up.t()) * factor
    return hook
