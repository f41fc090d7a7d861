"""GGUF Wan DiTs: tiny real models written with the gguf writer load, keep their quantized
weights packed, and compute what the dequantized float model computes."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from gguf_fixtures import encode_q4_k, encode_q6_k, write_gguf, write_wan_dit
from slipstream.kernels.gguf_linear import GGUFLinear
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.gguf_wan import load_wan_dit_gguf
from slipstream.models.wan.config import tiny
from slipstream.models.wan.dit import WanDiT, random_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")
Q = gguf.GGMLQuantizationType


def small(**kw):
    return tiny("t2v", text_dim=64, **kw)


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0]),
            torch.randn(1, 9, cfg.text_dim, generator=g))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("encode, qtype, bound", [(encode_q4_k, Q.Q4_K, 0.12), (encode_q6_k, Q.Q6_K, 0.03)])
def test_k_quant_fixture_encoders_produce_valid_blocks(encode, qtype, bound):
    x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    back = gguf.quants.dequantize(encode(x), qtype)
    assert back.shape == x.shape
    assert np.linalg.norm(back - x) / np.linalg.norm(x) < bound


@pytest.mark.parametrize("mix, bound", [("Q8_0", 0.01), ("Q4_K_M", 0.1)])
def test_tiny_gguf_dit_matches_dequantized_float_model(tmp_path, mix, bound):
    cfg = small()
    sd = random_state_dict(cfg, seed=3)
    path = tmp_path / f"tiny-{mix}.gguf"
    held = write_wan_dit(path, sd, mix, prefix="model.diffusion_model.")
    model = load_wan_dit_gguf(str(path), dtype=torch.float32)

    names = [n for n, m in model.named_modules() if isinstance(m, GGUFLinear)]
    packed = [model.get_submodule(n) for n in names]
    assert len(packed) == len(WanDiT.build_meta(cfg).quantizable_keys()) == 2 * 10   # every block Linear
    assert all(m.weight.dtype == torch.uint8 for m in packed)
    if mix == "Q4_K_M":
        assert {m.qtype.name for m in packed} == {"Q4_K", "Q6_K"}
        assert model.blocks[0].self_attn.v.qtype.name == "Q6_K"
        assert model.blocks[0].ffn[2].qtype.name == "Q6_K"
        assert model.blocks[0].self_attn.q.qtype.name == "Q4_K"
    stored = sum(m.weight.numel() for m in packed)
    floats = sum(m.in_features * m.out_features for m in packed)
    assert stored < floats * (0.65 if mix == "Q4_K_M" else 1.1)   # bytes vs weights: ~4.9 / 8.5 bits each

    reference = WanDiT.from_state_dict(held, dtype=torch.float32)   # the file's values, in float
    original = WanDiT.from_state_dict(sd, dtype=torch.float32)
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        out, ref, orig = model(x, t, ctx), reference(x, t, ctx), original(x, t, ctx)
    assert relative_error(out, ref) < 1e-5          # same numbers: only summation order differs
    weight_error = max(relative_error(held[k], sd[k]) for k in (n + ".weight" for n in names))
    assert 0 < weight_error < bound                  # the quantization really happened, at its usual size
    assert relative_error(out, orig) < 2 * weight_error + 1e-3
    for key in ("blocks.0.norm3.weight", "head.head.weight", "patch_embedding.weight"):
        assert torch.equal(model.state_dict()[key], held[key])


def test_dequantize_and_requantize_for_lora_merging(tmp_path):
    cfg = small(num_layers=1)
    held = write_wan_dit(tmp_path / "m.gguf", random_state_dict(cfg), "Q4_K_M")
    model = load_wan_dit_gguf(str(tmp_path / "m.gguf"), dtype=torch.float32)
    layer = model.blocks[0].self_attn.q
    weight = layer.dequantize()
    assert torch.allclose(weight, held["blocks.0.self_attn.q.weight"], atol=1e-6)
    delta = 0.01 * torch.randn_like(weight)
    layer.requantize(weight + delta)
    assert layer.qtype.name == "Q8_0" and layer.weight.dtype == torch.uint8
    assert relative_error(layer.dequantize(), weight + delta) < 0.01


def test_bf16_compute_keeps_packed_weights(tmp_path):
    cfg = small(num_layers=1)
    write_wan_dit(tmp_path / "m.gguf", random_state_dict(cfg), "Q8_0")
    model = load_wan_dit_gguf(str(tmp_path / "m.gguf"))
    assert model.compute_dtype == torch.bfloat16
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_other_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "llm.gguf"
    write_gguf(path, {"token_embd.weight": (np.ones((4, 32)), Q.F32)}, arch="llama")
    with pytest.raises(CheckpointError, match="'llama' model, not a Wan diffusion model"):
        load_wan_dit_gguf(str(path))


def test_truncated_file_says_fetch_again(tmp_path):
    path = tmp_path / "cut.gguf"
    write_wan_dit(path, random_state_dict(small(num_layers=1)), "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="damaged or truncated.*fetch it again"):
        load_wan_dit_gguf(str(path))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_wan_dit_gguf(str(path))


def test_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "wan")
    size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    writer.add_tensor("blocks.0.self_attn.q.weight", np.zeros((2, size[1]), dtype=np.uint8), raw_dtype=Q.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="blocks.0.self_attn.q.weight.*IQ4_NL is not supported"):
        load_wan_dit_gguf(str(path))
