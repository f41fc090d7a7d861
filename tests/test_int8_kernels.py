"""The int8 core: quantization math, ConvRot, the W8A8 layer, GEMM padding and the state-dict layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from slipstream.kernels import hadamard, int8_gemm
from slipstream.kernels.int8 import (
    Int8Linear,
    QuantizationError,
    canonical_scale,
    decode_comfy_quant,
    dequantize_weight,
    int8_report,
    quantize_activation,
    quantize_weight,
    quantize_with_scale,
    run_int8,
)


def _rel(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def _linear(k, n, seed=0, bias=True):
    """A float layer to quantize. It is never trained: without requires_grad its reference outputs
    carry no autograd graph (the int8 layers never do, as int8 tensors cannot require grad)."""
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias).requires_grad_(False)
    lin.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
    if bias:
        lin.bias.copy_(torch.randn(n, generator=gen) * 0.01)
    return lin


def _reference(lin, x):
    return F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())


# ------------------------------------------------------------------------- quantization math


def test_rowwise_quantization_is_symmetric_absmax_round_to_nearest():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 1.5, 3.0, 0.01]])
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (3, 1)
    assert torch.allclose(s[:, 0], torch.tensor([1 / 127, 1e-30, 3 / 127]))
    assert q[0].tolist() == [127, -64, 32, 0]          # -63.5 rounds to even (-64), 31.75 → 32
    assert q[1].tolist() == [0, 0, 0, 0]                # an all-zero row stays finite and zero
    assert q[2].tolist() == [-127, 64, 127, 0]          # 63.5 → 64 (even); symmetric, never -128
    assert int(q.min()) >= -127


def test_tensorwise_quantization_and_dequantization():
    w = torch.randn(32, 48)
    q, s = quantize_weight(w, per_row=False)
    assert s.shape == () and torch.isclose(s, w.abs().max() / 127)
    back = dequantize_weight(q, s)
    assert (back - w).abs().max() <= s / 2 + 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantization_reads_any_float_dtype_in_fp32(dtype):
    w = torch.randn(16, 64).to(dtype)
    q, s = quantize_weight(w)
    q32, s32 = quantize_weight(w.float())
    assert torch.equal(q, q32) and torch.equal(s, s32)


def test_quantization_refuses_nan_inf_and_non_matrices():
    w = torch.randn(4, 8)
    w[2, 3] = float("nan")
    with pytest.raises(QuantizationError, match="NaN/Inf"):
        quantize_weight(w)
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_weight(torch.randn(8))
    with pytest.raises(QuantizationError, match="float"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int8))
    with pytest.raises(QuantizationError, match="groups of 256"):
        quantize_weight(torch.randn(4, 100), rotation_group=256)


def test_chunked_quantization_equals_one_shot():
    w = torch.randn(3000, 96)    # several CPU row chunks
    q, s = quantize_weight(w)
    ref_s = (w.abs().amax(1, keepdim=True) / 127)
    assert torch.allclose(s, ref_s)
    assert torch.equal(q, torch.round(w / ref_s).to(torch.int8))


def test_stochastic_rounding_is_seeded_and_unbiased():
    w = torch.full((64, 256), 0.3) + torch.linspace(0, 1, 256) * 0.0   # between grid points
    w[:, 0] = 127.0                                                     # fixes the scale at 1.0
    a, _ = quantize_weight(w, seed=7)
    b, _ = quantize_weight(w, seed=7)
    c, _ = quantize_weight(w, seed=8)
    nearest, _ = quantize_weight(w)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert nearest[:, 1:].float().mean() == 0.0                         # round-to-nearest loses 0.3
    assert abs(a[:, 1:].float().mean().item() - 0.3) < 0.03             # stochastic keeps it on average


def test_quantize_with_a_given_scale_saturates():
    scale = torch.full((2, 1), 0.01)
    q = quantize_with_scale(torch.tensor([[0.5, 2.0], [-3.0, 0.014]]), scale)
    assert q.tolist() == [[50, 127], [-127, 1]]


def test_canonical_scale_shapes():
    assert canonical_scale(torch.tensor([0.5]), 4).shape == ()
    assert canonical_scale(torch.tensor(0.5), 4).shape == ()
    assert canonical_scale(torch.ones(4), 4).shape == (4, 1)
    assert canonical_scale(torch.ones(1, 4), 4).shape == (4, 1)
    assert canonical_scale(torch.ones(4, 1, dtype=torch.float16), 4).dtype == torch.float32
    with pytest.raises(QuantizationError, match="blockwise"):
        canonical_scale(torch.ones(4, 2), 4)


# ------------------------------------------------------------------------- ConvRot


@pytest.mark.parametrize("group", [4, 16, 64, 256])
def test_regular_hadamard_is_symmetric_orthogonal_and_matches_the_r4_kronecker(group):
    h = hadamard.regular_hadamard(group)
    assert torch.allclose(h, h.T)
    assert torch.allclose(h @ h, torch.eye(group), atol=1e-5)
    r4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    ref = r4
    while ref.shape[0] < group:
        ref = torch.kron(ref, r4)
    assert torch.allclose(h.double(), ref / group ** 0.5, atol=1e-7)


def test_hadamard_sizes_and_group_choice():
    assert [g for g in range(2, 1100) if hadamard.is_valid_group(g)] == [4, 16, 64, 256, 1024]
    with pytest.raises(ValueError, match="power of 4"):
        hadamard.regular_hadamard(128)
    assert hadamard.pick_group(1536) == 256 and hadamard.pick_group(8960) == 256
    assert hadamard.pick_group(64 * 3) == 64 and hadamard.pick_group(48) == 16 and hadamard.pick_group(40) == 0


def test_rotation_is_its_own_inverse_and_preserves_products():
    x, w = torch.randn(8, 512), torch.randn(16, 512)
    assert torch.allclose(hadamard.rotate(hadamard.rotate(x, 256), 256), x, atol=1e-5)
    assert torch.allclose(hadamard.rotate(x, 256) @ hadamard.rotate(w, 256).T, x @ w.T, atol=1e-3)


def test_rotated_weight_roundtrip_error_is_at_the_int8_floor():
    w = torch.randn(64, 512) / 512 ** 0.5
    q, s = quantize_weight(w, rotation_group=256)
    back = dequantize_weight(q, s, rotation_group=256)
    assert _rel(back, w) < 0.012


# ------------------------------------------------------------------------- the W8A8 layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [10, 256, 1200])
def test_output_dtype_follows_input_dtype_and_is_row_major(dtype, rows):
    """10 rows: eager kernels; 256: weight-left GEMM + compiled epilogue; 1200: activation-left GEMM."""
    layer = Int8Linear.from_float(_linear(2048, 1280))
    y = layer(torch.randn(2, rows // 2, 2048).to(dtype))
    assert y.dtype == dtype and y.shape == (2, rows // 2, 1280)
    x2 = torch.randn(rows, 2048)
    x8, sx = quantize_activation(x2)
    ref = (x8.float() @ layer.weight.float().T) * sx * layer.weight_scale.view(1, -1) + layer.bias
    assert torch.allclose(layer(x2), ref, rtol=1e-5, atol=1e-4)
    assert y.is_contiguous()                              # a transposed result slowed every later op


@pytest.mark.parametrize("k,n", [(1536, 1536), (8960, 256)])
def test_w8a8_error_on_gaussian_data_is_within_goal(k, n):
    lin = _linear(k, n)
    x = torch.randn(64, k)
    err = _rel(Int8Linear.from_float(lin)(x), _reference(lin, x))
    assert 0.005 < err < 0.015, err   # the int8 floor is ~1.1 %; below 0.5 % would mean no quantization


def test_convrot_fixes_channel_outliers():
    lin = _linear(1536, 512, seed=1)
    x = torch.randn(128, 1536)
    x[:, torch.randperm(1536)[:8]] *= 30.0
    ref = _reference(lin, x)
    plain = _rel(Int8Linear.from_float(lin)(x), ref)
    rotated = _rel(Int8Linear.from_float(lin, rotation_group=256)(x), ref)
    assert plain > 0.03 and rotated < 0.02, (plain, rotated)


def test_every_row_count_uses_the_int8_path_and_matches_dequantized_math():
    lin = _linear(96, 40, bias=False)
    layer = Int8Linear.from_float(lin)
    for m in (1, 3, 16, 17, 300):
        x = torch.randn(m, 96)
        x8, sx = quantize_activation(x)
        expected = (x8.float() @ layer.weight.float().T) * sx * layer.weight_scale.view(1, -1)
        assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.fallback_calls == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_outputs_are_computed_in_cache_sized_column_blocks(dtype):
    lin = _linear(64, 4000)                       # 300 × 4000 × 4 B > 4 MiB: two column blocks
    layer = Int8Linear.from_float(lin)
    x = torch.randn(300, 64).to(dtype)
    x8, sx = quantize_activation(x)
    expected = (x8.float() @ layer.weight.float().T) * sx * layer.weight_scale.view(1, -1) + lin.bias
    assert torch.allclose(layer(x).float(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                          atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_activation_quantization_is_per_row_and_chunk_independent():
    x = torch.randn(700, 256) * torch.logspace(-2, 2, 700).unsqueeze(1)
    q, s = quantize_activation(x)
    assert torch.allclose(s[:, 0], x.abs().amax(1) / 127)
    assert torch.equal(q, torch.round(x / s).to(torch.int8))
    qr, sr = quantize_activation(x, rotation_group=256)
    xr = hadamard.rotate(x, 256)
    assert torch.allclose(sr[:, 0], xr.abs().amax(1) / 127, rtol=1e-6)


def test_gemm_padding_rules_change_no_value():
    """CUDA's _int_mm refuses M ≤ 16 and K, N not multiples of 8: padded shapes give the same result."""
    rules = int8_gemm.CUDA_RULES
    lin = _linear(37, 13)
    layer = Int8Linear.from_float(lin)
    padded = int8_gemm.pad_weight(layer.weight, rules)
    assert padded.shape == (16, 40)
    for m in (1, 5, 33):
        x = torch.randn(m, 37)
        from slipstream.kernels.int8 import int8_linear
        y = int8_linear(x, padded, layer.weight_scale, layer.bias, 0, rules)
        assert y.shape == (m, 13)
        assert torch.allclose(y, layer(x), atol=1e-6)


def test_padded_layers_without_bias_or_row_scales_keep_their_out_features(monkeypatch):
    """A tensorwise scale and no bias say nothing about N: the padded N' must not leak into the output."""
    import slipstream.kernels.int8 as K

    q, s = quantize_weight(torch.randn(13, 37), per_row=False)
    layer = Int8Linear.from_quantized(q, s, None)
    x = torch.randn(5, 37)
    expected = layer(x)
    monkeypatch.setattr(K, "rules_for", lambda device: int8_gemm.CUDA_RULES)
    got = layer(x)
    assert got.shape == (5, 13) and torch.allclose(got, expected, atol=1e-6)
    assert layer.fallback_calls == 0


def test_devices_without_an_int8_gemm_fall_back_and_are_counted(monkeypatch):
    import slipstream.kernels.int8 as K
    from slipstream.kernels import int8_onednn

    with int8_onednn.use_backend(int8_onednn.BACKEND_INT_MM):   # a plain weight, as on such devices
        layer = Int8Linear.from_float(_linear(32, 16))
    x = torch.randn(4, 32)
    expected = layer(x)
    monkeypatch.setattr(K, "rules_for", lambda device: None)
    got = layer(x)
    assert layer.fallback_calls == 1 and int8_report(layer)["fallback_calls"] == 1
    ref = F.linear(x, layer.dequantize(), layer.bias)
    assert torch.allclose(got, ref, atol=1e-5) and _rel(got, expected) < 0.02
    owner = type("Owner", (), {})()
    run_int8(owner, x, layer.weight, layer.weight_scale, None, 0)
    assert owner.fallback_calls == 1


def test_requantize_stores_a_patched_weight_with_fresh_scales():
    layer = Int8Linear.from_float(_linear(256, 32), rotation_group=256)
    patched = layer.dequantize() * 2.0
    old_scale = layer.weight_scale.clone()
    layer.requantize(patched, seed=3)
    assert torch.allclose(layer.weight_scale, old_scale * 2.0, rtol=1e-5)
    assert _rel(layer.dequantize(), patched) < 0.012


# ------------------------------------------------------------------------- state dict: ComfyUI's layout


def test_state_dict_is_the_official_int8_layout_and_reloads_bit_for_bit():
    src = Int8Linear.from_float(_linear(512, 24), rotation_group=256)
    sd = src.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias", "comfy_quant"}
    assert sd["weight"].dtype == torch.int8 and sd["weight_scale"].dtype == torch.float32
    assert sd["weight_scale"].shape == (24, 1) and sd["comfy_quant"].dtype == torch.uint8
    assert decode_comfy_quant(sd["comfy_quant"]) == {"format": "int8_tensorwise", "convrot": True,
                                                     "convrot_groupsize": 256}
    dst = Int8Linear(512, 24)
    dst.load_state_dict(sd)
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.weight_scale, src.weight_scale)
    assert dst.rotation_group == 256
    x = torch.randn(3, 512)
    assert torch.equal(dst(x), src(x))


def test_load_state_dict_names_what_is_wrong():
    dst = Int8Linear(16, 8)
    bad = Int8Linear.from_float(_linear(16, 8)).state_dict()
    bad["weight"] = bad["weight"].float()
    with pytest.raises(RuntimeError, match="expected int8 weight"):
        dst.load_state_dict(bad)
    missing = Int8Linear.from_float(_linear(16, 8)).state_dict()
    del missing["weight_scale"]
    with pytest.raises(RuntimeError, match="weight_scale"):
        dst.load_state_dict(missing)


def test_parameters_never_require_grad_and_scales_stay_fp32():
    layer = Int8Linear.from_float(_linear(64, 16))
    assert not any(p.requires_grad for p in layer.parameters())
    layer.half()
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float16


# ------------------------------------------------------------------------- the fused (compiled) quantizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quantizer_math_is_bit_identical_to_the_eager_path(dtype, monkeypatch):
    from slipstream.kernels import int8_fused

    monkeypatch.setattr(int8_fused, "quantize_rows", lambda x, g: None)   # force the eager path
    x = (torch.randn(300, 512) * torch.logspace(-3, 3, 300).unsqueeze(1)).to(dtype)
    eager_q, eager_s = quantize_activation(x)
    ref_q, ref_s = int8_fused.quantize_rows_reference(x, 0)
    assert torch.equal(eager_q, ref_q) and torch.equal(eager_s, ref_s)


def test_compiled_epilogue_matches_the_eager_rescale():
    from slipstream.kernels import int8_fused, int8_gemm

    acc = torch.randint(-30000, 30000, (512, 1024), dtype=torch.int32)
    w_row, sx, bias = torch.rand(1, 1024), torch.rand(512, 1), torch.randn(1024)
    fused = int8_fused.rescale(acc, w_row, sx, bias)
    if fused is None:
        pytest.skip(f"torch.compile unavailable here: {int8_fused.status()}")
    eager = int8_gemm.rescale_(acc.clone(), sx, w_row, bias, torch.empty(512, 1024))
    assert torch.allclose(fused, eager, rtol=1e-6, atol=1e-6)


def test_compiled_quantizer_is_used_for_large_cpu_activations_and_matches():
    from slipstream.kernels import int8_fused

    x = torch.randn(512, 1024)                   # above MIN_ELEMENTS
    q, s = int8_fused.quantize_rows(x, 0) or (None, None)
    if int8_fused.status().startswith("off"):
        pytest.skip(f"torch.compile unavailable here: {int8_fused.status()}")
    ref_q, ref_s = int8_fused.quantize_rows_reference(x, 0)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s) and int8_fused.status() == "compiled"
    assert int8_fused.quantize_rows(torch.randn(4, 64), 0) is None          # small: eager is cheaper


def test_a_failing_compile_falls_back_to_eager_once(monkeypatch, caplog):
    from slipstream.kernels import int8_fused

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(int8_fused, "_state", {"quantize": broken, "rescale": broken})
    x = torch.randn(512, 1024)
    with caplog.at_level("WARNING", logger="slipstream.int8"):
        assert int8_fused.quantize_rows(x, 0) is None
        q, s = quantize_activation(x)
    assert "no C++ compiler" in caplog.text and int8_fused.status().startswith("off: RuntimeError")
    assert "rescale" not in int8_fused._state                     # one failure switches every kernel off
    assert torch.equal(q, int8_fused.quantize_rows_reference(x, 0)[0])
    monkeypatch.setattr(int8_fused, "_state", {})
    monkeypatch.setenv("SLIPSTREAM_INT8_COMPILE", "0")
    assert int8_fused.quantize_rows(x, 0) is None and int8_fused.status() == "off: SLIPSTREAM_INT8_COMPILE=0"


def test_the_first_compile_is_announced_once_with_its_time_and_torch_noise_is_dropped(monkeypatch, caplog):
    """The first int8 run on CPU compiles for ~15 s: the log says so before, and how long after;
    cpp_extension's "No CUDA runtime is found" (CUDA wheels on CPU machines) never reaches it."""
    import logging

    from slipstream.kernels import int8_fused

    calls = []

    def compiling(x2d, group, h):
        if not calls:                   # what inductor's first import of cpp_extension logs
            logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='x'")
            logging.getLogger("torch.utils.cpp_extension").warning("a real cpp_extension problem")
        calls.append(x2d.shape)
        return int8_fused.quantize_rows_reference(x2d, group)

    monkeypatch.setattr(int8_fused, "_state", {"quantize": compiling, "rescale": compiling})
    monkeypatch.setattr(int8_fused, "_announced", set())
    x = torch.randn(512, 1024)
    with caplog.at_level("INFO"):
        first = int8_fused.quantize_rows(x, 0)
        second = int8_fused.quantize_rows(x, 0)
    assert len(calls) == 2 and torch.equal(first[0], second[0])
    text = caplog.text
    assert text.count("compiling the fused CPU int8 kernels") == 1 and "10-20 s" in text
    assert text.count("ready in") == 1
    assert "No CUDA runtime is found" not in text and "a real cpp_extension problem" in text
    assert not logging.getLogger("torch.utils.cpp_extension").filters     # the filter does not outlive it


def test_fused_rotation_equals_the_full_hadamard():
    from slipstream.kernels import int8_fused

    x = torch.randn(8, 512)
    for group in (256, 64):
        h = int8_fused.rotation_matrix(group, x.device)
        assert torch.allclose(int8_fused._rotate(x, group, h), hadamard.rotate(x, group), atol=1e-5)


def test_comfy_kitchen_is_used_on_cuda_only_and_switched_off_by_a_failure(monkeypatch, caplog):
    import sys
    import types

    from slipstream.kernels import int8_kitchen

    calls = []
    fake = types.ModuleType("comfy_kitchen")
    fake.list_backends = lambda: {"cuda": {"available": True, "disabled": False}, "eager": {"available": True}}

    def fake_linear(x, w, s, b, out_dtype=None, convrot=False, convrot_groupsize=256):
        calls.append((tuple(x.shape), tuple(s.shape), convrot, convrot_groupsize, out_dtype))
        return torch.zeros(x.shape[0], w.shape[0], dtype=out_dtype)

    fake.int8_linear = fake_linear
    monkeypatch.setitem(sys.modules, "comfy_kitchen", fake)
    monkeypatch.setattr(int8_kitchen, "_state", {})
    layer = Int8Linear.from_float(_linear(256, 8), rotation_group=256)
    x = torch.randn(3, 256)
    assert int8_kitchen.linear(x, layer.weight, layer.weight_scale, None, 0) is None        # CPU: never
    out = int8_kitchen.linear(x, layer.weight, layer.weight_scale, None, 256, allow_cpu=True)
    assert out.shape == (3, 8) and calls == [((3, 256), (8, 1), True, 256, torch.float32)]
    fake.int8_linear = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel image"))
    monkeypatch.setattr(int8_kitchen, "_state", {"fn": fake.int8_linear})
    with caplog.at_level("WARNING", logger="slipstream.int8"):
        assert int8_kitchen.linear(x, layer.weight, layer.weight_scale, None, 0, allow_cpu=True) is None
    assert "no kernel image" in caplog.text and int8_kitchen.status().startswith("off")
    fake.list_backends = lambda: {"cuda": {"available": False, "disabled": False}}
    monkeypatch.setattr(int8_kitchen, "_state", {})
    assert int8_kitchen.linear(x, layer.weight, layer.weight_scale, None, 0, allow_cpu=True) is None
    assert "no usable CUDA/HIP backend" in int8_kitchen.status()


@pytest.mark.parametrize("group", [16, 64, 256, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kronecker_activation_rotation_equals_the_full_matrix(group, dtype):
    from slipstream.kernels import hadamard

    x = torch.randn(7, 2048, generator=torch.Generator().manual_seed(group)).to(dtype)
    out, work = torch.empty(7, 2048), torch.empty(7, 2048)
    fast = hadamard.rotate_kron(x, group, out=out, work=work)
    assert fast is out
    assert torch.allclose(fast, hadamard.rotate(x, group), rtol=1e-5, atol=1e-5)
