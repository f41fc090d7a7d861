"""Building our own architectures from a (canonical, possibly int8) state dict, without ComfyUI.

Inside ComfyUI the node hands the state dict to ComfyUI, which knows every architecture. In a
plain process we build the ones we implement: a small registry maps a model family to a builder
`(shapes, metadata) -> module on the meta device`. The module is then filled layer by layer:
each Linear goes through kernels.quant_layer.prepare_linear (int8 as stored, quantized on the
fly, scaled fp8 or float) and its file tensors are dropped from the dict as soon as they are
used, so a float checkpoint is never held twice while it is quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.int8 import decode_comfy_quant
from ..kernels.precision import is_fp8
from ..kernels.quant_layer import (
    PreparedLinear,
    QuantPlan,
    QuantReport,
    main_float_dtype,
    prepare_linear,
    set_submodule,
)
from .checkpoint import CheckpointError, check_state_dict

Shapes = Mapping[str, tuple[int, ...]]
Builder = Callable[[Shapes, Mapping[str, str]], nn.Module]


@dataclass(frozen=True)
class Architecture:
    family: str                 # model family name (models/quant_presets.py)
    title: str
    build: Builder              # (shapes under official names, file metadata) -> module on meta
    ignored_prefixes: tuple[str, ...] = ()   # tensors some exports carry that are not part of the model


def _build_wan(shapes: Shapes, metadata: Mapping[str, str]) -> nn.Module:
    from .wan.config import detect_config
    from .wan.dit import WanDiT

    return WanDiT.build_meta(detect_config(shapes, metadata, what="int8 checkpoint"))


def _build_anima(shapes: Shapes, metadata: Mapping[str, str]) -> nn.Module:
    from .anima.dit import AnimaDiT, config_from_state_dict

    config = config_from_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    with torch.device("meta"):
        return AnimaDiT(config)


def standalone_architectures() -> dict[str, Architecture]:
    """The families this package can run without ComfyUI (imported lazily: loading is rare)."""
    from .anima.dit import _IGNORED_KEY_PREFIXES as anima_ignored

    return {"wan": Architecture("wan", "Wan 2.1 DiT (Slipstream)", _build_wan),
            "anima": Architecture("anima", "Anima DiT (Slipstream)", _build_anima, tuple(anima_ignored))}


class QuantizedDiffusionModel(nn.Module):
    """The standalone MODEL's `.model`: ComfyUI's BaseModel shape, `.diffusion_model` inside."""

    def __init__(self, diffusion_model: nn.Module, family: str, report: QuantReport):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_family = family
        self.quant_report = report

    def forward(self, *args, **kwargs):
        return self.diffusion_model(*args, **kwargs)


def _float_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype float layers keep: the file's main float dtype (fp8 and int8 files compute in bf16)."""
    return main_float_dtype(sd) or torch.bfloat16


def _linear_names(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def build_quantized(sd: MutableMapping[str, torch.Tensor], arch: Architecture, plan: QuantPlan,
                    metadata: Mapping[str, str] | None = None, device: torch.device | str = "cpu",
                    on_layer: Callable[[int, int], None] | None = None) -> tuple[nn.Module, QuantReport]:
    """The architecture filled from a canonical state dict (prefix already stripped). Consumes `sd`.

    Raises CheckpointError naming missing, unexpected or wrongly shaped tensors.
    """
    for key in [k for k in sd if arch.ignored_prefixes and k.startswith(arch.ignored_prefixes)]:
        del sd[key]
    shapes = {k: tuple(v.shape) for k, v in sd.items()
              if not k.endswith((".weight_scale", ".comfy_quant"))}
    model = arch.build(shapes, metadata or {})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(expected, {k: torch.empty(s, device="meta") for k, s in shapes.items()},
                     f"the {arch.title}")
    float_dtype = _float_dtype(sd)
    report = QuantReport()
    names = _linear_names(model)
    for done, name in enumerate(names, 1):
        prepared = _prepare_from_sd(sd, name, plan, float_dtype)
        report.add(name, prepared)
        replacement = prepared.module(plan.fp8_fast)
        if replacement is not None:
            set_submodule(model, name, replacement.to(device))
        else:
            layer = model.get_submodule(name)
            layer.weight = nn.Parameter(prepared.weight.to(device), requires_grad=False)
            if prepared.bias is not None:
                layer.bias = nn.Parameter(prepared.bias.to(device=device, dtype=float_dtype), requires_grad=False)
        if on_layer is not None:
            on_layer(done, len(names))
    rest = {k: v.to(device=device, dtype=float_dtype) if v.is_floating_point() and not is_fp8(v.dtype) else v.to(device)
            for k, v in sd.items()}
    sd.clear()
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"the {arch.title} has no place for: {', '.join(unexpected[:8])}")
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise CheckpointError(f"the {arch.title} checkpoint lacks: {', '.join(on_meta[:8])}")
    return model.eval().requires_grad_(False), report


def _prepare_from_sd(sd: MutableMapping[str, torch.Tensor], name: str, plan: QuantPlan,
                     float_dtype: torch.dtype) -> PreparedLinear:
    weight = sd.pop(f"{name}.weight")
    bias = sd.pop(f"{name}.bias", None)
    scale = sd.pop(f"{name}.weight_scale", None)
    conf_t = sd.pop(f"{name}.comfy_quant", None)
    conf = decode_comfy_quant(conf_t) if conf_t is not None else None
    return prepare_linear(name, weight, bias, plan, float_dtype, scale=scale, conf=conf)


DEMO_CHECKPOINT = "slipstream_demo_wan_tiny_bf16.safetensors"


def write_demo_checkpoint(path: str) -> None:
    """A tiny random-weight Wan 2.1 T2V DiT in bf16 with ComfyUI's key prefix (the int8 demo's input).

    Real structure (128-wide heads, umT5 width 4096) so ComfyUI's own detection accepts it too.
    """
    import os

    from safetensors.torch import save_file

    from .wan.config import tiny
    from .wan.dit import random_state_dict

    os.makedirs(os.path.dirname(path), exist_ok=True)
    sd = random_state_dict(tiny("t2v"), seed=11, dtype=torch.bfloat16)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in sd.items()}, path)
