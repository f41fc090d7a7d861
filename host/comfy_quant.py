"""INT8 family inside ComfyUI: a `comfy.ops`-derived operations class built fresh for every load.

ComfyUI builds the model (every architecture it knows) and calls our `Linear._load_from_state_dict`
per layer; there kernels.quant_layer decides int8 / scaled fp8 / float. The configuration lives
in the closure of `make_operations`, never in class attributes shared between loads (the public
packs set flags on one global class, so a second load saw the first one's settings).

What keeps working on our int8 layers, and how:
* ComfyUI's offloading (`comfy_cast_weights`): the int8 weight travels as int8 and the scale with it.
* LoRA (ComfyUI's own loader): `convert_weight` dequantizes (rotation undone), ComfyUI patches in
  fp32, `set_weight` re-quantizes with fresh per-row scales and stochastic rounding seeded per
  key (round-to-nearest would snap small deltas back). ComfyUI's unpatch restores only `weight`,
  so the original scale is kept aside and put back when ComfyUI restores the weight. In-place
  updates (hook patches) re-quantize onto the *current* scale, because their unpatch copies int8
  data back in place without telling the layer.
* LoRA while offloaded (`weight_function`s): dequantize, apply, re-quantize, int8 GEMM.
* Saving: state_dict() is ComfyUI's official `int8_tensorwise` layout.
"""

from __future__ import annotations

import inspect
import zlib

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import torch
import torch.nn.functional as F

from ..kernels.fp8 import (
    dequantize_scaled_fp8,
    fp8_comfy_quant_config,
    fp8_linear,
    fp8_matmul_usable,
    quantize_fp8_with_scale,
    quantize_scaled_fp8,
)
from ..kernels.int8 import (
    comfy_quant_config,
    cpu_packed,
    decode_comfy_quant,
    dequantize_weight,
    encode_comfy_quant,
    quantize_weight,
    quantize_with_scale,
    requantize_weight,
    run_int8,
)
from ..kernels.int8_onednn import PackedInt8Weight
from ..kernels.precision import is_fp8
from ..kernels.quant_layer import QuantPlan, QuantReport, main_float_dtype, prepare_linear


def _lora_seed(key: str) -> int:
    """ComfyUI's string_to_seed(key) when it exists (same rounding noise as its own layers)."""
    seed_fn = getattr(comfy.model_patcher, "string_to_seed", None)
    return int(seed_fn(key)) if seed_fn is not None else zlib.crc32(key.encode())


def _run_every_op() -> None:
    hook = getattr(comfy.ops, "run_every_op", None)
    if hook is not None:
        hook()


def make_operations(plan: QuantPlan, report: QuantReport, on_layer=None) -> type:
    """A fresh operations class for one load: `manual_cast` for every op, our Linear for Linear.

    `on_layer(done, None)` is called after each Linear is loaded (progress and interrupt).
    """
    base = comfy.ops.manual_cast
    # Prepack only where the int8 layers will run on the CPU: on a GPU machine ComfyUI keeps
    # offloaded weights on the CPU and copies them over per call, which wants the plain layout.
    pack = cpu_packed if mm.get_torch_device().type == "cpu" else (lambda t: t)

    class Int8Operations(base):
        class Linear(base.Linear):
            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
                self.layer_kind = "float"
                self.rotation_group = 0
                self.fallback_calls = 0
                self.int_mm_fallback_calls = 0
                self.register_parameter("weight_scale", None)
                self._float_dtype = dtype if dtype is not None and not is_fp8(dtype) else None
                self._lora_seed = 0
                self.__dict__["_scale_backup"] = None
                self.__dict__["_installing"] = False

            # ---------------------------------------------------------------- loading / saving
            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                weight = state_dict.pop(prefix + "weight", None)
                if weight is None:
                    missing_keys.append(prefix + "weight")
                    return
                bias = state_dict.pop(prefix + "bias", None)
                scale = state_dict.pop(prefix + "weight_scale", None)
                conf_t = state_dict.pop(prefix + "comfy_quant", None)
                conf = decode_comfy_quant(conf_t) if conf_t is not None else None
                if self.bias is not None and bias is None:
                    missing_keys.append(prefix + "bias")
                float_dtype = self._float_dtype or (weight.dtype if weight.is_floating_point() and
                                                    not is_fp8(weight.dtype) else torch.bfloat16)
                prepared = prepare_linear(prefix.rstrip("."), weight, bias, plan, float_dtype, scale=scale, conf=conf)
                report.add(prefix.rstrip("."), prepared)
                device = self.weight.device if self.weight.device.type != "meta" else weight.device
                self.layer_kind = prepared.kind
                self.rotation_group = prepared.rotation_group
                self._install("weight", prepared.weight.to(device))
                self.weight_scale = None if prepared.scale is None else \
                    torch.nn.Parameter(prepared.scale.to(device), requires_grad=False)
                if prepared.bias is not None:
                    self.bias = torch.nn.Parameter(prepared.bias.to(device), requires_grad=False)
                # Dynamic-VRAM (aimdo) sizes its cast buffers from this; int8 must not be read as bf16.
                self.weight_comfy_model_dtype = self.weight.dtype
                self._lora_seed = _lora_seed("diffusion_model." + prefix + "weight")
                if on_layer is not None:
                    on_layer(len(report.entries), None)

            def _save_to_state_dict(self, destination, prefix, keep_vars):
                super()._save_to_state_dict(destination, prefix, keep_vars)
                if isinstance(self.weight, PackedInt8Weight):   # savers need the plain layout
                    destination[prefix + "weight"] = self.weight.dense()
                if self.layer_kind == "int8":
                    conf = comfy_quant_config(self.rotation_group)
                elif self.layer_kind == "fp8":
                    conf = fp8_comfy_quant_config(self.weight.dtype)
                else:
                    return
                destination[prefix + "comfy_quant"] = encode_comfy_quant(conf)

            def _install(self, name, tensor):
                if name == "weight" and self.layer_kind == "int8":
                    tensor = pack(tensor)             # the plain int8 copy is not kept beside it
                self.__dict__["_unpacked"] = None
                self.__dict__["_installing"] = True
                try:
                    setattr(self, name, torch.nn.Parameter(tensor, requires_grad=False))
                finally:
                    self.__dict__["_installing"] = False

            def __setattr__(self, name, value):
                # ComfyUI's unpatch puts the original weight back with a plain setattr; the scale
                # that belongs to it must come back too.
                if name == "weight" and not self.__dict__.get("_installing") and \
                        self.__dict__.get("_scale_backup") is not None:
                    backup = self.__dict__["_scale_backup"]
                    self.__dict__["_scale_backup"] = None
                    super().__setattr__("weight_scale", backup)
                    self.__dict__["_padded"] = None
                if name == "weight" and not self.__dict__.get("_installing") and \
                        self.__dict__.get("layer_kind") == "int8" and isinstance(value, torch.Tensor):
                    packed = pack(value.data)
                    if packed is not value.data:
                        value = torch.nn.Parameter(packed, requires_grad=False)
                    self.__dict__["_unpacked"] = None
                super().__setattr__(name, value)

            def _apply(self, fn, recurse=True):
                super()._apply(fn, recurse)
                if self.weight_scale is not None and self.weight_scale.dtype != torch.float32:
                    self.weight_scale = torch.nn.Parameter(self.weight_scale.float(), requires_grad=False)
                if self.layer_kind == "int8" and pack is cpu_packed and self.weight.device.type == "cpu" and \
                        not isinstance(self.weight, PackedInt8Weight):
                    self._install("weight", self.weight.data)      # back on the CPU: pack again
                self.__dict__["_padded"] = None
                return self

            # ---------------------------------------------------------------- compute
            def forward(self, x, *args, **kwargs):
                if self.layer_kind == "float":
                    return super().forward(x, *args, **kwargs)
                _run_every_op()
                if self.comfy_cast_weights or len(self.weight_function) or len(self.bias_function):
                    return self._forward_cast(x)
                if self.layer_kind == "int8":
                    return run_int8(self, x, self.weight, self.weight_scale, self.bias, self.rotation_group)
                fast = plan.fp8_fast and fp8_matmul_usable(x, self.weight)
                return fp8_linear(x, self.weight, self.weight_scale, self.bias, fast)

            def _forward_cast(self, x):
                """Weights live elsewhere (offloaded) or carry LoRA functions: move, patch, compute."""
                device = x.device
                non_blocking = mm.device_supports_non_blocking(device)
                weight = mm.cast_to(self.weight, None, device, non_blocking=non_blocking, copy=False)
                scale = mm.cast_to(self.weight_scale, torch.float32, device, non_blocking=non_blocking, copy=False)
                bias = None if self.bias is None else mm.cast_to(self.bias, None, device,
                                                                 non_blocking=non_blocking, copy=False)
                for f in self.bias_function:
                    bias = f(bias)
                if self.layer_kind == "fp8":
                    w = dequantize_scaled_fp8(weight, scale, x.dtype)
                    for f in self.weight_function:
                        w = f(w)
                    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
                rotation = self.rotation_group
                if len(self.weight_function):
                    w = dequantize_weight(weight, scale, torch.float32, rotation)
                    for f in self.weight_function:
                        w = f(w)
                    weight, scale = quantize_weight(w, per_row=True, rotation_group=rotation, seed=self._lora_seed)
                return run_int8(self, x, weight, scale, bias, rotation)

            # ---------------------------------------------------------------- LoRA (ComfyUI's patcher)
            def convert_weight(self, weight, inplace=False, **kwargs):
                """ComfyUI hands us the stored weight upcast to float: give back the real weight."""
                if self.layer_kind == "int8":
                    return dequantize_weight(weight, self.weight_scale.to(weight.device), torch.float32,
                                             self.rotation_group)
                if self.layer_kind == "fp8":
                    return dequantize_scaled_fp8(weight, self.weight_scale.to(weight.device), torch.float32)
                return weight

            def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
                """Store a patched float weight in this layer's own format (fresh scale unless in place)."""
                seed = int(seed) if seed else self._lora_seed
                if self.layer_kind == "float":
                    q, scale = comfy_float_round(weight, self.weight.dtype, seed), None
                elif inplace_update:
                    q, scale = self._encode_on_current_scale(weight, seed), None
                elif self.layer_kind == "int8":
                    q, scale = requantize_weight(weight, self.weight_scale, self.rotation_group, seed)
                else:
                    q, scale = quantize_scaled_fp8(weight, self.weight.dtype)
                if return_weight:
                    return q
                device = self.weight.device
                if inplace_update:
                    self.weight.data.copy_(q.to(device))
                    return None
                if scale is not None and self.__dict__.get("_scale_backup") is None:
                    self.__dict__["_scale_backup"] = self.weight_scale
                self._install("weight", q.to(device))
                if scale is not None:
                    self.weight_scale = torch.nn.Parameter(scale.to(device), requires_grad=False)
                self.__dict__["_padded"] = None
                return None

            def _encode_on_current_scale(self, weight, seed):
                scale = self.weight_scale.to(weight.device)
                if self.layer_kind == "int8":
                    return quantize_with_scale(weight, scale, self.rotation_group, seed)
                return quantize_fp8_with_scale(weight, scale, self.weight.dtype)

    return Int8Operations


def comfy_float_round(weight: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """ComfyUI's stochastic rounding to a float storage dtype (what it does for plain layers)."""
    import comfy.float

    return comfy.float.stochastic_rounding(weight, dtype, seed=seed)


def load_int8_diffusion_model(sd: dict, plan: QuantPlan, metadata: dict | None = None, on_layer=None):
    """(ModelPatcher, QuantReport): ComfyUI builds the architecture, our ops quantize its Linears."""
    report = QuantReport()
    options = {"custom_operations": make_operations(plan, report, on_layer)}
    # The layers that stay float keep the file's dtype (or the chosen fp8): left to itself ComfyUI
    # builds the model in fp32 on CPU, and a saved int8 file then carried fp32 copies of bf16 layers.
    kept = plan.float_storage or main_float_dtype(sd)
    if kept is not None:
        options["dtype"] = kept
    if plan.fp8_fast:
        options["fp8_optimizations"] = True
    loader = comfy.sd.load_diffusion_model_state_dict
    kwargs = {"model_options": options}
    if "metadata" in inspect.signature(loader).parameters:
        kwargs["metadata"] = metadata
    patcher = loader(sd, **kwargs)
    if patcher is None:
        raise ValueError("ComfyUI could not detect the architecture of this diffusion model (no supported "
                         "model matches its keys). Check that the file is a diffusion model (not a LoRA, VAE "
                         "or text encoder) and that your ComfyUI version supports it.")
    return patcher, report


def diffusion_state_dict(model) -> dict[str, torch.Tensor]:
    """The diffusion model's tensors with any LoRA baked in (as ComfyUI's own model save does)."""
    mm.load_models_gpu([model], force_patch_weights=True)
    return model.model.diffusion_model.state_dict()
