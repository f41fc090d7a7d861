"""Loading Wan's encoders (VAE, umT5, CLIP vision) from the layouts people actually have.

The same tower ships under different names (official, ComfyUI/HF, open_clip, kijai's `model.`
prefix, all-in-one files with `vae.` / `text_encoders.umt5xxl.transformer.` prefixes), sometimes
with q/k/v split where we keep them fused, sometimes as scaled fp8. Each model describes its
layouts as *recipes* — model key <- the file key(s) it is made of — and this module does the rest
the DiT loader does too (it reuses models/common/loading.py): locate the tower by an anchor key under any
prefix, check every name and shape against the meta-built model (computed from the header, before
any tensor is read), then stream the tensors one by one into their final dtype and device and let
the model adopt them. Nothing holds a second copy of the weights. `LoadableEncoder` is the one
from_file/from_state_dict the three towers share.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from ...kernels.cast_linear import CastLinear
from ...kernels.precision import is_fp8
from ..checkpoint import (
    PICKLE_EXTS,
    CheckpointError,
    check_state_dict,
    load_state_dict,
    read_safetensors_header,
)
from ..common.loading import (
    DtypePlan,
    assign_weights,
    plan_dtypes,
    read_safetensors,
    safetensors_dtype,
    split_weight_scales,
)

# Tensors quantized files carry beside the weights; they hold no weights of their own.
_MARKER_KEYS = frozenset({"scaled_fp8"})
_MARKER_SUFFIXES = (".comfy_quant",)


@dataclass(frozen=True)
class Source:
    """Where one model tensor comes from: file key(s) (without prefix) and how to combine them."""

    keys: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None

    def build(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return self.combine(parts) if self.combine is not None else parts[0]


Recipe = dict[str, Source]
Layout = Callable[[Sequence[str]], Recipe]
Transient = Callable[[str, torch.dtype], bool]


def identity_recipe(keys: Iterable[str]) -> Recipe:
    return {k: Source((k,)) for k in keys}


def rename(key: str, table: Iterable[tuple[re.Pattern, str]]) -> str:
    """The key as the first matching (pattern, replacement) of `table` renames it; unchanged if none matches."""
    for pattern, replacement in table:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


class TensorTable:
    """Names, shapes and dtypes of a checkpoint's tensors, and streaming any of them on demand.

    A safetensors file is described by its header alone and read tensor by tensor with plain
    reads (see loading.read_safetensors); a state dict or a pickled file is already in memory.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype],
                 streamer: Callable[[list[str], Transient | None], Iterator[tuple[str, torch.Tensor]]], name: str):
        self.shapes = dict(shapes)
        self.dtypes = dict(dtypes)
        self._streamer = streamer
        self.name = name

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], name: str = "state dict",
                        consume: bool = False) -> TensorTable:
        """With `consume`, each tensor leaves `sd` as it is streamed, so a caller that loaded the
        whole file does not keep it alive beside the converted model."""
        take = sd.pop if consume else sd.__getitem__
        return cls({k: tuple(v.shape) for k, v in sd.items()}, {k: v.dtype for k, v in sd.items()},
                   lambda keys, transient: ((k, take(k)) for k in keys), name)

    @classmethod
    def from_file(cls, path: str) -> TensorTable:
        if path.lower().endswith(PICKLE_EXTS):
            return cls.from_state_dict(load_state_dict(path), path)
        header, _ = read_safetensors_header(path)
        return cls({k: tuple(v["shape"]) for k, v in header.items()},
                   {k: safetensors_dtype(path, k, v["dtype"]) for k, v in header.items()},
                   lambda keys, transient: read_safetensors(path, keys, transient), path)

    def stream(self, keys: list[str], transient: Transient | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) in order. Tensors for which transient(key, dtype) is true may be views of a
        scratch buffer that the next item overwrites (for callers that convert each at once)."""
        return self._streamer(keys, transient)

    def read(self, keys: list[str]) -> list[torch.Tensor]:
        return [t for _, t in self.stream(keys)]


def find_prefix(keys: Iterable[str], anchors: Iterable[str]) -> tuple[str, str] | None:
    """(prefix, anchor) for the first anchor some key ends with, where the prefix is '' or ends in '.'."""
    keys = list(keys)
    for anchor in anchors:
        for key in keys:
            if key.endswith(anchor):
                prefix = key[: len(key) - len(anchor)]
                if prefix == "" or prefix.endswith("."):
                    return prefix, anchor
    return None


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Instantiate a module without allocating its weights."""
    with torch.device("meta"):
        return factory()


def load_encoder(table: TensorTable, layouts: Mapping[str, Layout],
                 build: Callable[[Mapping[str, tuple[int, ...]]], nn.Module], what: str, not_found: str,
                 dtype: torch.dtype | None = None, weight_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> nn.Module:
    """Find the tower in `table` by the layouts' anchor keys, check it, and stream it into a model.

    `build(shapes)` returns the model on the meta device for the model-key shapes. `dtype` is the
    compute dtype (default: the file's, bf16 for fp8 files); `weight_dtype` the storage of the
    Linear weights (default: fp8 files stay fp8, others use `dtype`).
    """
    found = find_prefix(table.shapes, layouts)
    if found is None:
        raise CheckpointError(f"{table.name}: {not_found}")
    prefix, anchor = found
    own = [k[len(prefix):] for k in table.shapes if k.startswith(prefix)]
    own = [k for k in own if k not in _MARKER_KEYS and not k.endswith(_MARKER_SUFFIXES)]
    weights, scale_keys = split_weight_scales({k: k for k in own})
    recipe = layouts[anchor](list(weights))
    _refuse_non_float(table, prefix, recipe)

    shapes = {t: _combined_shape(table, prefix, src) for t, src in recipe.items()}
    model = build_on_meta(lambda: build(shapes))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(expected, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, f"{what} ({table.name})")

    # Fused tensors (q/k/v made one) are rebuilt in float, so they are not kept in fp8.
    quantizable = [f"{n}.weight" for n, m in model.named_modules()
                   if isinstance(m, CastLinear) and len(recipe[f"{n}.weight"].keys) == 1]
    plan = plan_dtypes(dtype, weight_dtype, _main_dtype(table, prefix, recipe), quantizable)
    scales = _target_scales(table, prefix, recipe, scale_keys)
    single = {_layer(s.keys[0]) for s in recipe.values() if len(s.keys) == 1}
    part_scales = {layer: key for layer, key in scale_keys.items() if layer not in single}
    tensors = _stream(table, prefix, recipe, part_scales, plan, device)
    return assign_weights(model, tensors, plan, device, scales, lambda m: isinstance(m, CastLinear))


def _layer(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _combined_shape(table: TensorTable, prefix: str, src: Source) -> tuple[int, ...]:
    parts = [torch.empty(table.shapes[prefix + k], device="meta") for k in src.keys]
    return tuple(src.build(parts).shape)


def _refuse_non_float(table: TensorTable, prefix: str, recipe: Recipe) -> None:
    for target, src in recipe.items():
        for key in src.keys:
            stored = table.dtypes[prefix + key]
            if not stored.is_floating_point:
                raise CheckpointError(
                    f"{table.name}: tensor '{prefix + key}' is stored as {str(stored).removeprefix('torch.')}, "
                    f"a quantized format this loader does not read (for {target}). Use an fp16/bf16/fp32 "
                    "or fp8 file.")


def _main_dtype(table: TensorTable, prefix: str, recipe: Recipe) -> torch.dtype:
    """The dtype holding most of the weights: what 'keep the file's dtype' means."""
    counts: Counter[torch.dtype] = Counter()
    for src in recipe.values():
        for key in src.keys:
            counts[table.dtypes[prefix + key]] += max(1, _numel(table.shapes[prefix + key]))
    return counts.most_common(1)[0][0]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _target_scales(table: TensorTable, prefix: str, recipe: Recipe, scale_keys: Mapping[str, str]
                   ) -> dict[str, torch.Tensor]:
    """Weight scales of single-source weights, keyed by the model's layer path."""
    wanted = {}
    for target, src in recipe.items():
        if len(src.keys) == 1 and target.endswith(".weight") and _layer(src.keys[0]) in scale_keys:
            wanted[_layer(target)] = prefix + scale_keys[_layer(src.keys[0])]
    if not wanted:
        return {}
    values = table.read(list(wanted.values()))
    return dict(zip(wanted, values, strict=True))


def _stream(table: TensorTable, prefix: str, recipe: Recipe, part_scales: Mapping[str, str], plan: DtypePlan,
            device: torch.device | str | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(model key, tensor) one at a time, in one pass over the file.

    A tensor that is converted or moved right away is read into a reused scratch buffer (no heap
    fragmentation from freed temporaries); parts of fused tensors are dequantized before fusing.
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    target_of = {prefix + src.keys[0]: t for t, src in recipe.items() if len(src.keys) == 1}

    def transient(key: str, stored: torch.dtype) -> bool:
        target = target_of.get(key)
        return target is not None and (not on_cpu or plan.target(target, stored) != stored)

    order = [prefix + k for src in recipe.values() for k in src.keys]
    stream = table.stream(order, transient)
    for target, src in recipe.items():
        parts = [t for _, (_, t) in zip(src.keys, stream, strict=False)]
        if len(parts) > 1:
            parts = [_dequantized(table, prefix, key, part, part_scales) for key, part in zip(src.keys, parts, strict=True)]
        yield target, src.build(parts)
        del parts


def _dequantized(table: TensorTable, prefix: str, key: str, part: torch.Tensor, part_scales: Mapping[str, str]
                 ) -> torch.Tensor:
    """A part of a fused tensor in a dtype torch can concatenate, with its own scale applied."""
    if key.endswith(".weight") and _layer(key) in part_scales:
        (scale,) = table.read([prefix + part_scales[_layer(key)]])
        return part.float() * scale.float()
    return part.float() if is_fp8(part.dtype) else part


def module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


E = TypeVar("E", bound="LoadableEncoder")


class LoadableEncoder(nn.Module):
    """Base of the VAE, umT5 and CLIP vision towers: the two ways to load one, and where it lives.

    A subclass describes its files with `LAYOUTS` (anchor key -> recipe), `WHAT` (the model, for
    shape errors) and `NOT_FOUND` (what to pick instead, when no anchor matches), and builds its
    config from the model-key shapes with `config_from_shapes(shapes, **options)`.
    """

    LAYOUTS: Mapping[str, Layout]
    WHAT: str
    NOT_FOUND: str

    @staticmethod
    def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]):
        """The model's config for weights of these shapes (model keys, no prefix); each tower has its own."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    @classmethod
    def from_state_dict(cls: type[E], sd: MutableMapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, *, weight_dtype: torch.dtype | None = None,
                        consume: bool = False, **options) -> E:
        """Build from a state dict in any of the model's layouts, under any prefix.

        `dtype`: compute dtype (default: the file's; bf16 for fp8 files). `weight_dtype`: storage of
        the Linear weights (default: fp8 files stay fp8, ~half the memory; else `dtype`). Tensors
        already in the target dtype and device become the parameters without a copy; with `consume`
        the model's tensors leave `sd` as they are converted (prefer `from_file`, which never holds
        the whole file). `options` go to `config_from_shapes` (CLIP vision: `num_heads`).
        """
        return cls._load(TensorTable.from_state_dict(sd, consume=consume), dtype, device, weight_dtype, options)

    @classmethod
    def from_file(cls: type[E], path: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  *, weight_dtype: torch.dtype | None = None, **options) -> E:
        """Load a checkpoint file; safetensors are streamed tensor by tensor (no second copy in RAM)."""
        return cls._load(TensorTable.from_file(path), dtype, device, weight_dtype, options)

    @classmethod
    def _load(cls: type[E], table: TensorTable, dtype: torch.dtype | None, device: torch.device | str | None,
              weight_dtype: torch.dtype | None, options: Mapping[str, object]) -> E:
        return load_encoder(table, cls.LAYOUTS, lambda shapes: cls(cls.config_from_shapes(shapes, **options)),
                            cls.WHAT, cls.NOT_FOUND, dtype=dtype, weight_dtype=weight_dtype, device=device)
