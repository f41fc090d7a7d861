"""Quantized checkpoint dialects, read from safetensors files the tests write, and the saved layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from slipstream.kernels.cast_linear import Fp8Linear
from slipstream.kernels.fp8 import quantize_scaled_fp8
from slipstream.kernels.int8 import (
    Int8Linear,
    QuantizationError,
    decode_comfy_quant,
    dequantize_weight,
    encode_comfy_quant,
    quantize_weight,
)
from slipstream.kernels.quant_layer import ExclusionRules, QuantPlan, prepare_linear
from slipstream.models.checkpoint import load_state_dict, read_metadata
from slipstream.models.quant_formats import QuantFormatError, normalize

E4M3 = torch.float8_e4m3fn


def _roundtrip(tmp_path, sd, metadata=None):
    path = str(tmp_path / "model.safetensors")
    save_file(sd, path, metadata=metadata)
    return normalize(load_state_dict(path), read_metadata(path))


def _conf(sd, layer):
    return decode_comfy_quant(sd[f"{layer}.comfy_quant"])


def _layer(sd, name, plan=QuantPlan(), float_dtype=torch.float32):
    return prepare_linear(name, sd[f"{name}.weight"], sd.get(f"{name}.bias"), plan, float_dtype,
                          scale=sd.get(f"{name}.weight_scale"),
                          conf=_conf(sd, name) if f"{name}.comfy_quant" in sd else None)


W = torch.randn(24, 256) / 16


def test_official_int8_with_convrot_flags_top_level_or_under_params(tmp_path):
    q, s = quantize_weight(W, rotation_group=256)
    sd = {"a.weight": q, "a.weight_scale": s, "a.bias": torch.zeros(24),
          "a.comfy_quant": encode_comfy_quant({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}),
          "b.weight": q.clone(), "b.weight_scale": s.clone(),
          "b.comfy_quant": encode_comfy_quant({"format": "int8_tensorwise",
                                               "params": {"convrot": True, "convrot_groupsize": 256}})}
    out, report = _roundtrip(tmp_path, sd)
    assert report.formats["int8_tensorwise"] == 2 and report.prequantized
    for name in ("a", "b"):
        assert _conf(out, name) == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
        layer = _layer(out, name, QuantPlan(on_the_fly=True, exclude=ExclusionRules.of([name])))
        assert layer.kind == "int8" and layer.rotation_group == 256 and layer.note == "pre-quantized"
        assert torch.equal(layer.weight, q) and torch.equal(layer.scale, s)


@pytest.mark.parametrize("scale_shape", [(), (1,), (24,), (24, 1)])
def test_older_int8_packs_without_comfy_quant(tmp_path, scale_shape):
    per_row = scale_shape not in ((), (1,))
    q, s = quantize_weight(W, per_row=per_row)
    out, report = _roundtrip(tmp_path, {"l.weight": q, "l.weight_scale": s.reshape(scale_shape)})
    assert report.formats["int8_tensorwise"] == 1
    assert out["l.weight_scale"].shape == ((24, 1) if per_row else ())
    layer = _layer(out, "l")
    assert torch.allclose(dequantize_weight(layer.weight, layer.scale), W, atol=float(s.max()) / 2 + 1e-6)


@pytest.mark.parametrize("conf", [{"convrot": True, "convrot_groupsize": 256, "per_row": True},
                                  {"quarot": True, "quarot_groupsize": 256}])
def test_format_less_bobjohnson_files_load_with_their_rotation(tmp_path, conf):
    q, s = quantize_weight(W, rotation_group=256)
    out, _ = _roundtrip(tmp_path, {"l.weight": q, "l.weight_scale": s, "l.comfy_quant": encode_comfy_quant(conf)})
    assert _conf(out, "l") == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
    layer = _layer(out, "l")
    assert (dequantize_weight(layer.weight, layer.scale, rotation_group=layer.rotation_group) - W).abs().max() < 0.02


def test_explicit_hadamard_layers_are_dequantized_to_fp32(tmp_path):
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    h = torch.kron(torch.kron(h, h), h)              # Sylvester 8, stored unnormalised (±1)
    sigma = torch.rand(256) + 0.5
    rotated = ((W * sigma).reshape(-1, 8) @ (h / 8 ** 0.5).T).reshape(W.shape)
    q, s = quantize_weight(rotated)
    out, report = _roundtrip(tmp_path, {"l.weight": q, "l.weight_scale": s, "l.quarot_hadamard": h,
                                        "l.hadanorm_sigma": sigma})
    assert out["l.weight"].dtype == torch.float32 and "l.quarot_hadamard" not in out
    assert (out["l.weight"] - W).abs().max() < 0.02
    assert "explicit Hadamard" in report.summary()


def test_header_quantization_metadata(tmp_path):
    w8, scale = quantize_scaled_fp8(W, E4M3)
    q, s = quantize_weight(W)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
        "f": {"format": "float8_e4m3fn"}, "i": "int8_tensorwise"}})}
    out, report = _roundtrip(tmp_path, {"f.weight": w8, "f.weight_scale": scale, "i.weight": q, "i.weight_scale": s},
                             meta)
    assert _conf(out, "f") == {"format": "float8_e4m3fn"} and _conf(out, "i") == {"format": "int8_tensorwise"}


def test_legacy_scaled_fp8_scale_is_applied_before_int8(tmp_path):
    """The public packs dropped the fp8 scale; here it is applied in fp32, then per-row int8."""
    big = W * 300.0                                      # beyond e4m3's range without its scale
    w8, scale = quantize_scaled_fp8(big, E4M3)
    sd = {"scaled_fp8": torch.zeros(1, dtype=E4M3), "l.weight": w8, "l.scale_weight": scale.reshape(1),
          "l.scale_input": torch.ones(1), "l.bias": torch.zeros(24)}
    out, report = _roundtrip(tmp_path, sd)
    assert "scaled_fp8" not in out and "l.scale_input" not in out and report.dropped == ["l.scale_input"]
    assert _conf(out, "l") == {"format": "float8_e4m3fn"}
    layer = _layer(out, "l", QuantPlan(on_the_fly=True))
    assert layer.kind == "int8" and "from scaled fp8" in layer.note
    back = dequantize_weight(layer.weight, layer.scale)
    assert float((back - big).norm() / big.norm()) < 0.05            # fp8 + int8 double rounding
    kept = _layer(out, "l", QuantPlan(on_the_fly=True, exclude=ExclusionRules.of(["l"])), torch.bfloat16)
    assert kept.kind == "float" and kept.weight.dtype == torch.bfloat16
    assert float((kept.weight.float() - big).norm() / big.norm()) < 0.05


def test_comfy_quant_fp8_kept_as_stored_when_fp8_storage_is_chosen(tmp_path):
    w8, scale = quantize_scaled_fp8(W, E4M3)
    out, _ = _roundtrip(tmp_path, {"l.weight": w8, "l.weight_scale": scale,
                                   "l.comfy_quant": encode_comfy_quant({"format": "float8_e4m3fn"})})
    layer = _layer(out, "l", QuantPlan(float_storage=E4M3))
    assert layer.kind == "fp8" and torch.equal(layer.weight.view(torch.uint8), w8.view(torch.uint8))
    module = layer.module()
    assert isinstance(module, Fp8Linear)
    assert decode_comfy_quant(module.state_dict()["comfy_quant"]) == {"format": "float8_e4m3fn"}
    x = torch.randn(3, 256)
    assert float((module(x) - x @ W.T).norm() / (x @ W.T).norm()) < 0.06


def test_plain_fp8_cast_files_and_float_files(tmp_path):
    out, report = _roundtrip(tmp_path, {"c.weight": W.to(E4M3), "f.weight": W.bfloat16()})
    assert report.formats["float8_e4m3fn (plain cast)"] == 1 and float(out["c.weight_scale"]) == 1.0
    assert "f.comfy_quant" not in out
    assert _layer(out, "f").kind == "float"


@pytest.mark.parametrize("sd,match", [
    ({"l.weight": torch.zeros(4, 4, dtype=torch.int8)}, "without weight_scale"),
    ({"l.weight": torch.zeros(4, 4, dtype=torch.uint8), "l.weight_scale": torch.ones(()),
      "l.comfy_quant": encode_comfy_quant({"format": "nvfp4"})}, "'nvfp4'"),
    ({"l.weight": torch.zeros(4, 4, dtype=torch.int8), "l.weight_scale": torch.ones(4, 2, 1)}, "blockwise"),
    ({"l.weight": torch.zeros(4, 4, dtype=torch.int8), "l.weight_scale": torch.ones(4, 1),
      "l.comfy_quant": encode_comfy_quant({"format": "int8_blockwise"})}, "int8_blockwise"),
    ({"l.weight": torch.zeros(4, 4), "l.weight_scale": torch.ones(())}, "unknown dialect"),
    ({"l.weight": torch.zeros(4, 4), "m.weight_scale": torch.ones(())}, "without a weight"),
    ({"l.weight": torch.zeros(4, 4, dtype=E4M3), "l.weight_scale": torch.ones(4)}, "row- or blockwise fp8"),
])
def test_ambiguous_or_unsupported_layers_are_refused_by_name(tmp_path, sd, match):
    with pytest.raises(QuantFormatError, match=match):
        _roundtrip(tmp_path, sd)


def test_prepare_names_the_layer_in_errors():
    bad = torch.randn(8, 16)
    bad[0, 0] = float("inf")
    with pytest.raises(QuantizationError, match=r"layer 'blocks.3.ffn.0': .*NaN/Inf"):
        prepare_linear("blocks.3.ffn.0", bad, None, QuantPlan(on_the_fly=True), torch.float32)


def test_saved_layout_roundtrips_bit_for_bit_through_a_file(tmp_path):
    """quantize → save (official layout) → load → identical int8 tensors and scales."""
    layers = {"per_row": Int8Linear.from_float(torch.nn.Linear(256, 24)),
              "rotated": Int8Linear.from_float(torch.nn.Linear(256, 24), rotation_group=256)}
    sd = {f"{name}.{k}": v for name, layer in layers.items() for k, v in layer.state_dict().items()}
    out, _ = _roundtrip(tmp_path, sd)
    for name, layer in layers.items():
        loaded = _layer(out, name).module()
        assert torch.equal(loaded.weight, layer.weight) and torch.equal(loaded.weight_scale, layer.weight_scale)
        assert loaded.rotation_group == layer.rotation_group
