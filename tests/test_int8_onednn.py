"""The prepacked oneDNN CPU backend: same numbers as `torch._int_mm`, one copy of each weight,
re-packing after every weight change, a counted fallback, and a choice made by CPU features."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file
from slipstream.kernels import int8_onednn
from slipstream.kernels.int8 import Int8Linear, backend_calls, int8_report
from slipstream.models.quant_loading import read_int8_file

pytestmark = pytest.mark.skipif(int8_onednn.backend() != int8_onednn.BACKEND_PREPACKED,
                                reason=f"this machine runs {int8_onednn.describe()}")

# (M, K, N): odd sizes, K not a multiple of 4, a single row, a single output
SHAPES = [(3, 5, 7), (1, 13, 6), (5, 6, 1), (1, 1, 1), (33, 70, 19)]


def _pair(k, n, seed, bias=True, per_row=True):
    """The same int8 layer twice: prepacked, and on plain torch._int_mm."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=gen) * 0.02 + 1e-3 if per_row else torch.tensor(0.013)
    b = torch.randn(n, generator=gen) if bias else None
    packed = Int8Linear.from_quantized(q.clone(), scale, b)
    with int8_onednn.use_backend(int8_onednn.BACKEND_INT_MM):
        plain = Int8Linear.from_quantized(q.clone(), scale, b)
    return packed, plain, q


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_packed_kernel_gives_int_mm_accumulator_bit_for_bit(m, k, n):
    gen = torch.Generator().manual_seed(m * 100 + k)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    x8 = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    packed = int8_onednn.pack(w)
    ones_row, ones = torch.ones(m, 1), torch.ones(n, 1)
    acc = int8_onednn.linear(x8, ones_row, packed, ones, None, torch.float32)
    assert torch.equal(acc, torch._int_mm(x8, w.t()).float())        # |acc| < 2^24: exact in fp32
    tensorwise = int8_onednn.linear(x8, ones_row, packed, torch.tensor(1.0), None, torch.float32)
    assert torch.equal(tensorwise, acc)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_layer_equals_int_mm_layer(m, k, n, per_row, bias, dtype):
    packed, plain, _ = _pair(k, n, seed=m + k + n, bias=bias, per_row=per_row)
    assert isinstance(packed.weight, int8_onednn.PackedInt8Weight) and not isinstance(
        plain.weight, int8_onednn.PackedInt8Weight)
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(7)).to(dtype)
    before = backend_calls()
    y, ref = packed(x), plain(x)
    after = backend_calls()
    assert y.dtype == dtype and y.shape == (2, m, n)
    assert torch.equal(y, ref)          # same int32 products, same epilogue order: the same numbers
    assert after[int8_onednn.BACKEND_PREPACKED] == before.get(int8_onednn.BACKEND_PREPACKED, 0) + 1


def test_a_packed_layer_holds_one_copy_and_still_reads_as_its_int8_weight():
    packed, _, q = _pair(64, 48, seed=1)
    w = packed.weight
    assert isinstance(w, torch.nn.Parameter) and w.shape == (48, 64) and w.dtype == torch.int8
    assert packed._unpacked is None and packed._padded is None   # no plain copy beside the packing
    sd = packed.state_dict()
    assert type(sd["weight"]) is torch.Tensor and torch.equal(sd["weight"], q)   # savers get the plain layout
    assert torch.equal(w, q) and torch.equal(w.float(), q.float()) and torch.equal(w.detach().clone(), q)
    assert w.contiguous().is_contiguous() and torch.equal(w.contiguous(), q)
    report = int8_report(packed)
    assert report["packed_layers"] == 1 and report["int8_weight_bytes"] == q.numel()
    assert torch.equal(packed.dequantize(), q.float() * packed.weight_scale)


def test_lora_requantization_repacks():
    packed, plain, _ = _pair(256, 32, seed=2)
    old = packed.weight.packed
    patched = packed.dequantize() + 0.01 * torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    packed.requantize(patched, seed=5)
    plain.requantize(patched, seed=5)
    assert isinstance(packed.weight, int8_onednn.PackedInt8Weight) and packed.weight.packed is not old
    assert torch.equal(packed.weight, plain.weight) and torch.equal(packed.weight_scale, plain.weight_scale)
    x = torch.randn(9, 256)
    assert torch.equal(packed(x), plain(x))


def test_an_in_place_weight_write_repacks():
    """ComfyUI's in-place LoRA update and its undo copy int8 data into `weight.data`."""
    packed, plain, q = _pair(40, 24, seed=4)
    new = torch.randint(-127, 128, q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    packed.weight.data.copy_(new)
    plain.weight.data.copy_(new)
    assert isinstance(packed.weight, int8_onednn.PackedInt8Weight) and torch.equal(packed.weight, new)
    x = torch.randn(5, 40)
    assert torch.equal(packed(x), plain(x))


def test_loading_a_state_dict_packs_and_moving_the_module_keeps_the_packing():
    packed, plain, q = _pair(32, 16, seed=6)
    fresh = Int8Linear(32, 16)
    fresh.load_state_dict(plain.state_dict())
    assert isinstance(fresh.weight, int8_onednn.PackedInt8Weight) and torch.equal(fresh.weight, q)
    fresh.to("cpu").half()
    plain.half()                                          # the bias is fp16 in both now
    assert isinstance(fresh.weight, int8_onednn.PackedInt8Weight) and fresh.weight_scale.dtype == torch.float32
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), plain(x))


def test_a_refusal_falls_back_to_int_mm_counted_and_logged_once(monkeypatch, caplog):
    packed, plain, _ = _pair(48, 20, seed=7)
    other, _, _ = _pair(48, 20, seed=8)

    def refuse(*args):
        raise RuntimeError("onednn: unsupported shape")

    monkeypatch.setattr(int8_onednn, "_pointwise", refuse)
    monkeypatch.delitem(int8_onednn._state, "refused", raising=False)
    x = torch.randn(6, 48)
    with caplog.at_level(logging.WARNING, logger="slipstream.int8"):
        y, y2 = packed(x), packed(x)
        other(x)
    assert torch.equal(y, plain(x)) and torch.equal(y2, y)
    assert packed.int_mm_fallback_calls == 2 and int8_report(packed)["int_mm_fallback_calls"] == 2
    assert other.int_mm_fallback_calls == 1
    warnings = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and "torch._int_mm" in warnings[0].getMessage()
    assert "unsupported shape" in int8_onednn.refusal()


def test_a_weight_oneDNN_cannot_pack_stays_plain_and_is_reported(monkeypatch, caplog):
    def refuse(dense):
        raise RuntimeError("prepack: bad weight")

    monkeypatch.setattr(int8_onednn, "_pack_raw", refuse)
    monkeypatch.delitem(int8_onednn._state, "refused", raising=False)
    with caplog.at_level(logging.WARNING, logger="slipstream.int8"):
        layer = Int8Linear.from_quantized(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1), None)
    assert type(layer.weight.data) is torch.Tensor and int8_report(layer)["packed_layers"] == 0
    assert "bad weight" in caplog.text
    assert torch.allclose(layer(torch.ones(1, 8)), torch.full((1, 4), 8.0))


@pytest.mark.parametrize("features,ops,expected", [
    ({"amx": True, "vnni": True}, True, "onednn-prepacked (AMX)"),
    ({"amx": False, "vnni": True}, True, "onednn-prepacked (VNNI)"),
    ({"amx": False, "vnni": False}, True, "torch._int_mm (no AMX or VNNI"),
    ({"amx": True, "vnni": True}, False, "torch._int_mm (this torch build has no oneDNN qlinear ops"),
])
def test_backend_is_chosen_by_cpu_features(monkeypatch, features, ops, expected):
    monkeypatch.setattr(int8_onednn, "_state", {})
    monkeypatch.setattr(int8_onednn, "cpu_features", lambda: {"avx512": True, "avx2": True, **features})
    monkeypatch.setattr(int8_onednn, "_ops_present", lambda: ops)
    monkeypatch.delenv("SLIPSTREAM_INT8_CPU_BACKEND", raising=False)
    assert int8_onednn.describe().startswith(expected)
    prepacked = expected.startswith(int8_onednn.BACKEND_PREPACKED)
    assert (int8_onednn.pack(torch.ones(4, 4, dtype=torch.int8)) is not None) == prepacked
    monkeypatch.setattr(int8_onednn, "_state", {})
    monkeypatch.setenv("SLIPSTREAM_INT8_CPU_BACKEND", "int_mm")
    assert int8_onednn.backend() == int8_onednn.BACKEND_INT_MM


def test_features_line_names_the_backend():
    line = int8_onednn.cpu_features_line()
    assert line.startswith("CPU features: ") and int8_onednn.describe() in line


def test_per_row_activation_scales_stay_exact_with_outlier_rows():
    """Row scales are applied after the kernel: a row 1000× larger does not coarsen the others."""
    packed, plain, _ = _pair(64, 16, seed=9, bias=False)
    x = torch.randn(4, 64)
    x[2] *= 1000.0
    y = packed(x)
    assert torch.equal(y, plain(x))
    small = packed(x[[0, 1, 3]])
    assert torch.equal(small, y[[0, 1, 3]])


def test_the_kernel_oneDNN_runs_is_an_optimised_one_not_its_reference_code():
    """With int8 activations oneDNN ran its reference matmul for the prepacked weight (~1000x
    slower than bf16); the layer feeds uint8 + 128 so an optimised kernel (brgemm) runs."""
    name = int8_onednn.kernel_implementation()
    assert not name.startswith(("ref", "unknown")), name
    assert int8_onednn.cpu_features()["vnni"] or int8_onednn.cpu_features()["amx"]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_the_uint8_activation_form_is_the_int8_one_plus_128(m, k, n):
    from slipstream.kernels.int8 import quantize_activation

    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    q, s = quantize_activation(x)
    u, su = quantize_activation(x, unsigned=True)
    assert u.dtype == torch.uint8 and torch.equal(su, s)
    assert torch.equal(u.to(torch.int16) - 128, q.to(torch.int16))


def test_the_compiled_uint8_quantizer_matches_the_eager_one(monkeypatch):
    from slipstream.kernels import int8_fused
    from slipstream.kernels.int8 import quantize_activation

    x = (torch.randn(512, 1024) * torch.logspace(-3, 3, 512).unsqueeze(1)).bfloat16()
    fused = int8_fused.quantize_rows_u8(x, 0)
    if fused is None:
        pytest.skip(f"torch.compile unavailable here: {int8_fused.status()}")
    monkeypatch.setattr(int8_fused, "quantize_rows_u8", lambda x, g: None)   # force the eager path
    eager = quantize_activation(x, unsigned=True)
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_large_inputs_through_the_compiled_quantizer_equal_int_mm(per_row, bias):
    packed, plain, _ = _pair(1024, 96, seed=11, bias=bias, per_row=per_row)
    x = torch.randn(300, 1024, generator=torch.Generator().manual_seed(12)).bfloat16()   # >= 256 K values
    assert torch.equal(packed(x), plain(x))



def _int8_file(tmp_path):
    """Two int8 layers of different sizes (read through one reused buffer), an int8 vector, floats."""
    gen = torch.Generator().manual_seed(11)
    tensors = {"a.weight": torch.randint(-127, 128, (16, 24), generator=gen, dtype=torch.int8),
               "a.weight_scale": torch.rand(16, 1, generator=gen),
               "b.weight": torch.randint(-127, 128, (8, 12), generator=gen, dtype=torch.int8),
               "b.weight_scale": torch.rand(8, 1, generator=gen),
               "codes": torch.randint(-127, 128, (10,), generator=gen, dtype=torch.int8),
               "norm.weight": torch.randn(24, generator=gen).bfloat16()}
    path = tmp_path / "int8.safetensors"
    save_file(tensors, str(path))
    return str(path), tensors


def test_the_int8_file_reader_packs_each_int8_weight_as_it_reads_it(tmp_path):
    """The state dict holds packed weights from the start: a host that keeps it referenced until the
    whole model is loaded (ComfyUI's loader) never holds the plain int8 weights beside the packed."""
    path, tensors = _int8_file(tmp_path)
    sd = read_int8_file(path, torch.device("cpu"))
    assert set(sd) == set(tensors)
    for key in ("a.weight", "b.weight"):
        assert isinstance(sd[key], int8_onednn.PackedInt8Weight) and torch.equal(sd[key].dense(), tensors[key])
    for key in ("a.weight_scale", "codes", "norm.weight"):
        assert type(sd[key]) is torch.Tensor and sd[key].dtype == tensors[key].dtype
        assert torch.equal(sd[key], tensors[key])
    layer = Int8Linear(24, 16)
    layer.load_state_dict({"weight": sd["a.weight"], "weight_scale": sd["a.weight_scale"],
                           "bias": torch.zeros(16)})
    assert layer.weight.packed is sd["a.weight"].packed, "the layer keeps the packed weight it was given"


def test_a_weight_the_reader_cannot_pack_is_kept_as_its_own_plain_tensor(tmp_path, monkeypatch):
    """Read into a reused buffer, a weight oneDNN refuses must be copied out, or the next weight read
    would overwrite it."""
    path, tensors = _int8_file(tmp_path)
    monkeypatch.setattr(int8_onednn, "pack", lambda dense, what="a layer": None)
    sd = read_int8_file(path, torch.device("cpu"))
    for key in ("a.weight", "b.weight"):
        assert type(sd[key]) is torch.Tensor and torch.equal(sd[key], tensors[key])
    assert sd["a.weight"].untyped_storage().data_ptr() != sd["b.weight"].untyped_storage().data_ptr()
