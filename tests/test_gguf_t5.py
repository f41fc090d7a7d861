"""GGUF umT5 encoders in llama.cpp's naming: tiny real files written with the gguf writer load with
packed block Linears and encode what the dequantized float encoder encodes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from slipstream.kernels.gguf_linear import GGUFLinear
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.gguf_t5 import load_umt5_gguf
from slipstream.models.wan import t5 as T
from slipstream.models.wan.demo_assets import seeded_state_dict

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from gguf_fixtures import Q, write_gguf, write_umt5  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
# Widths that fill whole 256-weight K blocks; the real structure otherwise.
CFG = T.UMT5Config(vocab_size=320, dim=256, dim_attn=256, dim_ffn=512, num_heads=4, num_layers=2)


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    def draw(name: str, shape: torch.Size, noise: torch.Tensor) -> torch.Tensor:
        if "norm" in name:
            return 1.0 + 0.2 * noise
        return noise if "embedding" in name else noise / math.sqrt(shape[1])

    return seeded_state_dict(lambda: T.UMT5Encoder(CFG), seed, draw)


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M"])
def test_gguf_umt5_matches_the_dequantized_encoder(tmp_path, mix):
    sd = state_dict()
    held = write_umt5(tmp_path / f"umt5-{mix}.gguf", sd, mix)
    encoder = load_umt5_gguf(str(tmp_path / f"umt5-{mix}.gguf"), dtype=torch.float32)
    packed = [m for m in encoder.modules() if isinstance(m, GGUFLinear)]
    assert len(packed) == CFG.num_layers * 7
    assert encoder.config == CFG
    reference = T.UMT5Encoder.from_state_dict(dict(held), dtype=torch.float32)
    original = T.UMT5Encoder.from_state_dict(dict(sd), dtype=torch.float32)
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    out = encoder(ids, mask)
    assert relative_error(out, reference(ids, mask)) < 1e-5
    weight_error = max(relative_error(held[k], sd[k]) for k in sd if k.startswith("blocks.") and ".norm" not in k)
    assert 0 < weight_error < (0.01 if mix == "Q8_0" else 0.1)
    # a random umT5 (unscaled attention) amplifies weight noise several times; a trained one much less
    assert 0 < relative_error(out, original(ids, mask)) < 10 * weight_error
    assert torch.equal(out[1, 8:], torch.zeros_like(out[1, 8:]))


def test_a_dit_gguf_is_not_taken_for_a_text_encoder(tmp_path):
    path = tmp_path / "dit.gguf"
    write_gguf(path, {"blocks.0.self_attn.q.weight": (np.ones((4, 32)), Q.F32)}, arch="wan")
    with pytest.raises(CheckpointError, match="'wan' model, not the umT5 text encoder"):
        load_umt5_gguf(str(path))


def test_missing_tensor_is_named(tmp_path):
    sd = state_dict()
    del sd["blocks.1.ffn.fc2.weight"]
    write_umt5(tmp_path / "cut.gguf", sd, "Q8_0")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.fc2\.weight"):
        load_umt5_gguf(str(tmp_path / "cut.gguf"))
