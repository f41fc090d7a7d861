"""LoHa, LoKr, DoRA and `diff_m` against independent float64 formulas, merged and unmerged.

The references below are written element by element (or block by block) in float64, not with the
library's helpers, so a wrong axis, scale or factor order in models/common/lora_formulas.py fails.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from slipstream.models.common.lora_formulas import kron_apply
from slipstream.models.wan.config import tiny
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.lora import merge_lora, parse_lora
from slipstream.models.wan.lora_runtime import attach_lora

TARGET = "blocks.1.cross_attn.o"      # [256, 256]
FFN = "blocks.0.ffn.0"                # [512, 256]


pytestmark = pytest.mark.usefixtures("single_thread")


@lru_cache(maxsize=1)
def _weights() -> dict[str, torch.Tensor]:
    return random_state_dict(tiny("t2v", text_dim=64, clip_dim=96), seed=11)


def model_and_sd():
    sd = _weights()
    return WanDiT.from_state_dict({k: v.clone() for k, v in sd.items()}), sd


def rand(*shape, seed: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def matmul64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.double() @ b.double()


def loha_reference(f: dict, alpha: float) -> torch.Tensor:
    rank = f["hada_w1_b"].shape[0]
    return matmul64(f["hada_w1_a"], f["hada_w1_b"]) * matmul64(f["hada_w2_a"], f["hada_w2_b"]) * (alpha / rank)


def kron_reference(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Block (i, j) of w1 ⊗ w2 is w1[i, j] · w2, assembled by hand."""
    a, b = w1.shape
    c, d = w2.shape
    out = torch.zeros(a * c, b * d, dtype=torch.float64)
    for i in range(a):
        for j in range(b):
            out[i * c:(i + 1) * c, j * d:(j + 1) * d] = w1[i, j].double() * w2.double()
    return out


def dora_reference(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float):
    """W + s·(m·(W+ΔW)/‖W+ΔW‖ − W), the norm per output row or per input column, element loops in float64."""
    patched = weight.double() + delta.double()
    out = torch.empty_like(patched)
    per_row = magnitude.numel() == patched.shape[0] and magnitude.shape[0] == patched.shape[0]
    m = magnitude.double().reshape(-1)
    if per_row:
        for i in range(patched.shape[0]):
            out[i] = m[i] * patched[i] / torch.sqrt((patched[i] ** 2).sum())
    else:
        for j in range(patched.shape[1]):
            out[:, j] = m[j] * patched[:, j] / torch.sqrt((patched[:, j] ** 2).sum())
    return weight.double() + strength * (out - weight.double())


def inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([600.0]), torch.randn(1, 5, 64, generator=g)


def check_merge_and_runtime(lora: dict, target: str, expected: torch.Tensor, strength: float):
    """Merging gives the float64 reference weight; running unmerged gives the merged model's output."""
    model, sd = model_and_sd()
    x, t, ctx = inputs()
    with attach_lora(model, lora, strength) as attached:
        assert attached.report.applied == [target] and not attached.report.skipped
        unmerged = model(x, t, ctx)
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), f"{key} changed by a run-time LoRA"
    report = merge_lora(model, lora, strength)
    assert report.applied == [target]
    torch.testing.assert_close(model.get_parameter(target + ".weight").double(), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(unmerged, model(x, t, ctx), rtol=1e-5, atol=1e-5)


def test_loha_matches_the_hadamard_product_of_two_low_rank_products():
    f = {"hada_w1_a": rand(256, 4, seed=1), "hada_w1_b": rand(4, 256, seed=2),
         "hada_w2_a": rand(256, 4, seed=3), "hada_w2_b": rand(4, 256, seed=4)}
    lora = {f"lycoris_blocks_1_cross_attn_o.{k}": v for k, v in f.items()}
    lora["lycoris_blocks_1_cross_attn_o.alpha"] = torch.tensor(2.0)
    weight = model_and_sd()[1][TARGET + ".weight"]
    check_merge_and_runtime(lora, TARGET, weight.double() + 0.7 * loha_reference(f, 2.0), 0.7)


@pytest.mark.parametrize("w1_whole,w2_whole", [(True, False), (False, True), (True, True), (False, False)])
def test_lokr_matches_a_hand_built_kronecker_product(w1_whole, w2_whole):
    w1 = rand(16, 8, seed=5)            # [512, 256] = [16·32, 8·32]
    w2a, w2b = rand(32, 3, seed=6), rand(3, 32, seed=7)
    w1a, w1b = rand(16, 2, seed=8), rand(2, 8, seed=9)
    w2 = rand(32, 32, seed=10, scale=0.05)
    stem = "diffusion_model.blocks.0.ffn.0"
    lora = {f"{stem}.alpha": torch.tensor(6.0)}
    lora.update({f"{stem}.lokr_w1": w1} if w1_whole else {f"{stem}.lokr_w1_a": w1a, f"{stem}.lokr_w1_b": w1b})
    lora.update({f"{stem}.lokr_w2": w2} if w2_whole else {f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b})
    left = w1 if w1_whole else matmul64(w1a, w1b)
    right = w2 if w2_whole else matmul64(w2a, w2b)
    # alpha divides by the rank of the last factor given as a product; two whole factors ignore alpha
    rank = None if w2_whole and w1_whole else (w1b.shape[0] if w2_whole else w2b.shape[0])
    scale = 1.0 if rank is None else 6.0 / rank
    weight = model_and_sd()[1][FFN + ".weight"]
    check_merge_and_runtime(lora, FFN, weight.double() + 1.3 * scale * kron_reference(left, right), 1.3)


def test_kron_apply_equals_multiplying_by_the_kronecker_product():
    w1, w2, x = rand(3, 4, seed=1), rand(5, 6, seed=2), rand(7, 2, 24, seed=3)
    expected = x.double() @ kron_reference(w1, w2).t()
    torch.testing.assert_close(kron_apply(x.double(), w1.double(), w2.double()), expected)


@pytest.mark.parametrize("axis", ["rows", "rows_flat", "columns"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dora_matches_the_weight_decomposition_formula(axis, strength):
    down, up = rand(4, 256, seed=11), rand(256, 4, seed=12)
    weight = model_and_sd()[1][TARGET + ".weight"]
    norms_rows = (weight.double() + matmul64(up, down) * 0.5).norm(dim=1)
    base = {"rows": norms_rows.reshape(-1, 1), "rows_flat": norms_rows,
            "columns": (weight.double() + matmul64(up, down) * 0.5).norm(dim=0).reshape(1, -1)}[axis]
    magnitude = (base * (1 + rand(*base.shape, seed=13, scale=0.3).double())).float()
    stem = "diffusion_model.blocks.1.cross_attn.o"
    lora = {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up, f"{stem}.alpha": torch.tensor(2.0),
            f"{stem}.dora_scale": magnitude}
    expected = dora_reference(weight, matmul64(up, down) * 0.5, magnitude, strength)
    check_merge_and_runtime(lora, TARGET, expected, strength)


def test_dora_after_another_lora_on_the_same_layer_normalises_the_patched_weight():
    """Two LoRAs on one layer, the second a DoRA: merged in order and run unmerged, both agree."""
    model, sd = model_and_sd()
    stem = "diffusion_model.blocks.1.cross_attn.o"
    first = {f"{stem}.lora_A.weight": rand(4, 256, seed=21), f"{stem}.lora_B.weight": rand(256, 4, seed=22)}
    second = {f"{stem}.lora_A.weight": rand(4, 256, seed=23), f"{stem}.lora_B.weight": rand(256, 4, seed=24),
              f"{stem}.dora_scale": rand(256, 1, seed=25).abs() + 1.0}
    from slipstream.models.wan.lora_runtime import RuntimeLora, attach_chain

    x, t, ctx = inputs()
    chain = [RuntimeLora("a", parse_lora(first, model), 0.8), RuntimeLora("b", parse_lora(second, model), 0.5)]
    with attach_chain(model, chain):
        unmerged = model(x, t, ctx)
    step1 = sd[TARGET + ".weight"].double() + 0.8 * matmul64(first[f"{stem}.lora_B.weight"],
                                                             first[f"{stem}.lora_A.weight"])
    expected = dora_reference(step1, matmul64(second[f"{stem}.lora_B.weight"], second[f"{stem}.lora_A.weight"]),
                              second[f"{stem}.dora_scale"], 0.5)
    merge_lora(model, first, 0.8)
    merge_lora(model, second, 0.5)
    torch.testing.assert_close(model.get_parameter(TARGET + ".weight").double(), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(unmerged, model(x, t, ctx), rtol=1e-5, atol=1e-5)


def test_diff_m_patches_the_block_modulation_and_small_tensors_run_unmerged_too():
    model, sd = model_and_sd()
    diff_m, diff_norm, diff_b = rand(1, 6, 256, seed=31), rand(256, seed=32), rand(256, seed=33)
    lora = {"diffusion_model.blocks.1.diff_m": diff_m, "diffusion_model.blocks.0.norm3.diff": diff_norm,
            "diffusion_model.blocks.0.norm3.diff_b": diff_b, "diffusion_model.head.diff_m": rand(1, 2, 256, seed=34),
            "diffusion_model.patch_embedding.diff_b": rand(256, seed=35)}
    parsed = parse_lora(lora, model)
    assert sorted(parsed.patches) == ["blocks.0.norm3", "blocks.1.modulation", "head.modulation",
                                      "patch_embedding"] and not parsed.unknown
    x, t, ctx = inputs()
    with attach_lora(model, lora, 1.5):
        unmerged = model(x, t, ctx)
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), f"{key} not restored"
    merge_lora(model, lora, 1.5)
    torch.testing.assert_close(model.blocks[1].modulation.double(),
                               sd["blocks.1.modulation"].double() + 1.5 * diff_m.double())
    torch.testing.assert_close(unmerged, model(x, t, ctx), rtol=1e-5, atol=1e-5)
