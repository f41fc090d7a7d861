"""GGUF dequantization against the `gguf` package's numpy reference, bit pattern by bit pattern.

Random bytes exercise every code, sign and packed-scale combination of a block type; only the fp16
scale fields are drawn as finite values so the comparison is between numbers. The reference is the
decoder llama.cpp's own Python package ships, so agreement means our torch decoders read real files.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from slipstream.kernels import gguf_dequant as gd

QUANTIZED = [t for t in gd.QUANT_TYPES.values() if t.decode is not None]


def test_every_quantized_type_knows_where_its_scales_are():
    expected = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
                "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
    assert {t.name: t.scale_offsets for t in QUANTIZED} == expected


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(qtype):
    rows, blocks_per_row = 6, 3
    generator = torch.Generator().manual_seed(qtype.ggml_id)
    raw = gd.random_blocks(qtype, rows * blocks_per_row, generator).reshape(rows, -1).numpy()
    reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype.ggml_id))
    assert reference.shape == (rows, blocks_per_row * qtype.block_size)
    ours = gd.dequantize(torch.from_numpy(raw), qtype, reference.shape)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types_round_trip_their_bytes(name):
    qtype = gd.QUANT_BY_NAME[name]
    values = torch.randn(4, 8).to(qtype.float_dtype)
    raw = values.view(torch.uint8) if values.element_size() > 1 else values
    out = gd.dequantize(raw.reshape(-1), qtype, (4, 8), torch.float32)
    assert torch.equal(out, values.float())


def test_gguf_ids_match_the_gguf_package():
    for qtype in gd.QUANT_TYPES.values():
        member = gguf.GGMLQuantizationType(qtype.ggml_id)
        assert member.name == qtype.name
        assert gguf.GGML_QUANT_SIZES[member] == (qtype.block_size, qtype.type_size)


def test_unsupported_type_names_itself_and_the_alternatives():
    with pytest.raises(gd.UnsupportedQuantError, match="IQ2_XXS.*supported: F32"):
        gd.quant_type(int(gguf.GGMLQuantizationType.IQ2_XXS), "IQ2_XXS")


def test_row_bytes_refuses_rows_that_do_not_fill_blocks():
    assert gd.QUANT_BY_NAME["Q4_K"].row_bytes(512) == 288
    with pytest.raises(ValueError, match="256 weights per block"):
        gd.QUANT_BY_NAME["Q4_K"].row_bytes(300)
