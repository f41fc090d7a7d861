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
  LoRAs that also touch norms; a `diff` on a bare parameter (`blocks.N.modulation.diff`) too, and
  `blocks.N.diff_m`, the same modulation difference under its short name.
- LyCORIS families: LoHa (`hada_w1_a/b`, `hada_w2_a/b`), LoKr (`lokr_w1` or `lokr_w1_a/b`,
  `lokr_w2` or `lokr_w2_a/b`), and DoRA (`dora_scale` beside any of them). The formulas are in
  models/common/lora_formulas.py. Tucker factors (`lora_mid`, `hada_t*`, `lokr_t2`: conv-only)
  are reported as not understood.

Two ways to apply, neither keeps a second copy of the model:
- `merge_lora(model, lora, strength)` adds `strength · ΔW` (DoRA: moves the weight towards its
  re-normalised form) to each weight in place. Float layers are updated directly (in fp32,
  rounded once to their dtype); any layer with a `dequantize()`/`requantize(weight)` pair (fp8
  `CastLinear`, int8 `Int8Linear`) is dequantized, patched and requantized one layer at a time.
  Merging `-strength` undoes an additive LoRA (exact up to the storage dtype's rounding).
- `lora_runtime.attach_lora(model, lora, strength)` leaves every weight alone and adds the
  LoRA to layer outputs while it is attached (models/wan/lora_runtime.py).
Both take `blocks`: which transformer blocks a LoRA touches (`parse_blocks("0-9, 15")`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..common.block_list import parse_block_list
from ..common.lora_formulas import dora_weight, loha_delta, lokr_delta, lowrank_delta

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "pipe.dit.",
            "model.")
KOHYA_PREFIXES = ("lora_unet__", "lora_unet_", "lycoris_")
# key ending -> the LoraPatch field it fills; checked in order, longest first where they overlap.
KINDS = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"), (".dora_scale", "dora_scale"), (".diff_b", "diff_b"), (".diff", "diff"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"), (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"), (".lokr_w1", "lokr_w1"), (".lokr_w2", "lokr_w2"),
)
# `blocks.N.diff_m` is the difference of `blocks.N.modulation` (a bare parameter, no `.weight`).
MODULATION_DIFF = ".diff_m"
# Tucker (conv-only) decompositions and LyCORIS norm patches: understood as formats, not applied.
UNSUPPORTED = (".lora_mid.weight", ".hada_t1", ".hada_t2", ".lokr_t2", ".w_norm", ".b_norm")
FACTOR_KINDS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
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
# "blocks.N." after the start, a dot or kohya's "lora_unet_" (so "vace_blocks.N" is not block N)
_BLOCK = re.compile(r"(?:^|\.|lora_unet_)blocks[._](\d+)[._]")
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
    dora_scale: torch.Tensor | None = None  # DoRA magnitude: [out, 1] / [out] per row, [1, in] per column
    factors: dict[str, torch.Tensor] = field(default_factory=dict)   # LoHa / LoKr tensors by kind

    @property
    def family(self) -> str | None:
        """"lora", "loha", "lokr", or None when the patch holds only full differences."""
        if self.down is not None or self.up is not None:
            return "lora"
        if any(k.startswith("hada_") for k in self.factors):
            return "loha"
        if any(k.startswith("lokr_") for k in self.factors):
            return "lokr"
        return None

    def incomplete(self) -> str | None:
        """What is missing for this patch's family, or None when it is whole."""
        family = self.family
        kinds = {k.split("_")[0] for k in self.factors} | ({"lora"} if family == "lora" else set())
        if len(kinds) > 1:
            return "mixes keys of different LoRA kinds (" + ", ".join(sorted(kinds)) + ") on one layer"
        if family == "lora" and (self.down is None) != (self.up is None):
            return "lora_A/down without lora_B/up (or the reverse)"
        if family == "loha" and any(k not in self.factors for k in FACTOR_KINDS[:4]):
            return "LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b"
        if family == "lokr":
            for side in ("w1", "w2"):
                whole = f"lokr_{side}" in self.factors
                pair = f"lokr_{side}_a" in self.factors and f"lokr_{side}_b" in self.factors
                if not whole and not pair:
                    return f"LoKr needs lokr_{side} or both lokr_{side}_a and lokr_{side}_b"
        if self.dora_scale is not None and family is None:
            return "dora_scale without the LoRA it rescales"
        return None

    @property
    def scale(self) -> float:
        """alpha / rank for the patch's family (1 without alpha)."""
        rank = None
        if self.family == "lora" and self.down is not None:
            rank = self.down.shape[0]
        elif self.family == "loha":
            rank = self.factors["hada_w1_b"].shape[0]
        elif self.family == "lokr":   # the rank of the last factor given as a product (none: alpha unused)
            for side in ("w2", "w1"):
                if f"lokr_{side}" not in self.factors and f"lokr_{side}_b" in self.factors:
                    rank = self.factors[f"lokr_{side}_b"].shape[0]
                    break
        if self.alpha is None or rank is None:
            return 1.0
        return self.alpha / rank

    def lokr_factors(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2) of a LoKr patch, each built from its pair when not stored whole."""
        def side(name: str) -> torch.Tensor:
            whole = self.factors.get(f"lokr_{name}")
            if whole is not None:
                return whole.to(device=device, dtype=dtype)
            return self.factors[f"lokr_{name}_a"].to(device=device, dtype=dtype) @ \
                self.factors[f"lokr_{name}_b"].to(device=device, dtype=dtype)
        return side("w1"), side("w2")

    def delta_shape(self) -> tuple[int, int] | None:
        """[out, in·k…] of the family's weight difference, from the factors' shapes (nothing built)."""
        family = self.family
        if family == "lora":
            return self.up.shape[0], math.prod(self.down.shape[1:])
        if family == "loha":
            return self.factors["hada_w1_a"].shape[0], self.factors["hada_w1_b"].shape[1]
        if family == "lokr":
            shapes = []
            for name in ("w1", "w2"):
                whole = self.factors.get(f"lokr_{name}")
                shapes.append(tuple(whole.shape) if whole is not None else
                              (self.factors[f"lokr_{name}_a"].shape[0], self.factors[f"lokr_{name}_b"].shape[1]))
            return shapes[0][0] * shapes[1][0], shapes[0][1] * shapes[1][1]
        return None

    def to(self, device) -> LoraPatch:
        """This patch with every tensor on `device` (dtypes kept): moved once, used for a whole run."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return LoraPatch(self.target, move(self.down), move(self.up), self.alpha, move(self.diff), move(self.diff_b),
                         move(self.dora_scale), {k: v.to(device) for k, v in self.factors.items()})

    def family_delta(self, device=None) -> torch.Tensor | None:
        """The family's ΔW (scale applied, no strength) in fp32, flattened to [out, in·k…]."""
        family = self.family
        if family == "lora":
            return lowrank_delta(self.up.to(device), self.down.to(device), self.scale)
        if family == "loha":
            f = {k: v.to(device) for k, v in self.factors.items()}
            return loha_delta(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"], self.scale)
        if family == "lokr":
            return lokr_delta(*self.lokr_factors(device), self.scale)
        return None

    def weight_delta(self, strength: float, device=None) -> torch.Tensor | None:
        """strength · (family ΔW + diff) in fp32, or None if this patch has no weight part.
        (DoRA is not additive: see `merge_lora`.)"""
        delta = self.family_delta(device)
        if self.diff is not None:
            diff = self.diff.to(device=device, dtype=torch.float32)
            delta = diff if delta is None else delta + diff.view_as(delta)
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
    if key.endswith(MODULATION_DIFF):
        return key[: -len(MODULATION_DIFF)] + ".modulation", "diff"
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
        elif kind in FACTOR_KINDS:
            patch.factors[kind] = tensor
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
        if patch.diff is None or patch.family is not None:
            return None, None, "only a full 'diff' can patch a bare parameter"
        if tuple(patch.diff.shape) != tuple(param.shape):
            return None, None, f"shape {tuple(patch.diff.shape)} does not fit {tuple(param.shape)}"
        return None, param, None
    missing = patch.incomplete()
    if missing is not None:
        return None, None, missing
    want = _weight_shape(module)
    got = patch.delta_shape()
    if got is not None:
        # conv LoRAs flatten to [out, in·k] like the weight they patch
        fits = want is not None and got == (want[0], math.prod(want[1:]))
        if patch.family == "lora":
            fits = fits and patch.up.flatten(1).shape[1] == patch.down.shape[0]
        if not fits:
            return None, None, (f"LoRA shape {got} does not fit the layer's weight {want} "
                                "(made for another model size?)")
    if patch.diff is not None and (want is None or tuple(patch.diff.shape) != want):
        return None, None, f"diff shape {tuple(patch.diff.shape)} does not fit the layer's weight {want}"
    if patch.dora_scale is not None and want is not None and patch.dora_scale.numel() not in (want[0], math.prod(want[1:])):
        return None, None, f"dora_scale {tuple(patch.dora_scale.shape)} fits neither the rows nor the columns of {want}"
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
                        "Wan 2.1 model (1.3B vs 14B, t2v vs i2v), or widen the block selection.")
    return report


def _as_lora_set(lora: LoraSet | Mapping[str, torch.Tensor], model: nn.Module) -> LoraSet:
    return lora if isinstance(lora, LoraSet) else parse_lora(lora, model)


def parse_blocks(text: str) -> tuple[int, ...]:
    """"0-9, 15" -> (0, 1, …, 9, 15); "" -> () meaning every block. Raises ValueError on bad syntax."""
    return parse_block_list(text, "Block selection")


def block_of(key: str) -> int | None:
    """The transformer block a model or LoRA key belongs to (official, ComfyUI and kohya spellings)."""
    m = _BLOCK.search(key)
    return int(m.group(1)) if m else None


def block_filter(model: nn.Module, blocks: tuple[int, ...]) -> Callable[[str], str | None] | None:
    """A test `target -> reason to skip | None` for a block selection (None: every block).

    Layers outside the transformer blocks (embeddings, head) are always patched; a selection
    naming blocks the model does not have is an error, not a silent no-op.
    """
    if not blocks:
        return None
    count = len(getattr(model, "blocks", ()))
    past = [b for b in blocks if b >= count]
    if past:
        raise LoraError(f"Block selection names block(s) {', '.join(map(str, past[:5]))}, but this model has "
                        f"{count} blocks (0-{count - 1}); lower the selection.")
    chosen = frozenset(blocks)

    def skip(target: str) -> str | None:
        block = block_of(target)
        return None if block is None or block in chosen else "block not selected"
    return skip


@torch.no_grad()
def merge_lora(model: nn.Module, lora: LoraSet | Mapping[str, torch.Tensor], strength: float = 1.0,
               blocks: tuple[int, ...] = ()) -> LoraReport:
    """Add a LoRA into the model's weights in place (see the module docstring); `blocks` limits it
    to those transformer blocks (empty: all)."""
    lora = _as_lora_set(lora, model)
    skip = block_filter(model, blocks)
    image_model = any("k_img" in name for name, _ in model.named_modules())
    report = LoraReport()
    for target, patch in lora.patches.items():
        reason = None if skip is None else skip(target)
        if reason is None:
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


def patched_weight(weight: torch.Tensor, patch: LoraPatch, strength: float) -> torch.Tensor:
    """The fp32 weight `weight` (shaped as the layer's) with one patch in at `strength`: what merging
    stores (before rounding to the storage dtype) and what run-time exact mode computes with."""
    if patch.dora_scale is not None:
        return dora_weight(weight, patch.weight_delta(1.0, weight.device), patch.dora_scale.to(weight.device),
                           strength).view_as(weight)
    return weight + patch.weight_delta(strength, weight.device).view_as(weight)


def _merge_into(module: nn.Module, patch: LoraPatch, strength: float) -> None:
    if patch.family is not None or patch.diff is not None:
        quantized = _is_quantized(module)
        weight = module.dequantize(torch.float32) if quantized else module.weight.float()
        patched = patched_weight(weight, patch, strength)
        if quantized:
            module.requantize(patched.view_as(weight))
        else:
            module.weight.copy_(patched.view_as(weight).to(module.weight.dtype))
    if patch.diff_b is not None:
        bias = module.bias
        bias.copy_((bias.float() + patch.diff_b.to(bias.device, torch.float32) * strength).to(bias.dtype))


