"""Wan LoRAs: every key format maps to the right layer and merges to exactly the hand-merged weight,
on float, fp8 and int8-style layers; run-time attachment equals merging and detaches exactly."""

from __future__ import annotations

import pytest
import torch
from slipstream.models.wan.config import tiny
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.lora import LoraError, merge_lora, parse_lora
from slipstream.models.wan.lora_runtime import attach_lora
from torch import nn

RANK = 4

pytestmark = pytest.mark.usefixtures("single_thread")


def small(model_type="t2v"):
    return tiny(model_type, text_dim=64, clip_dim=96)


def model_and_sd(model_type="t2v", **kw):
    sd = random_state_dict(small(model_type), seed=11)
    return WanDiT.from_state_dict({k: v.clone() for k, v in sd.items()}, **kw), sd


def low_rank(out_f: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, in_f, generator=g) * 0.1, torch.randn(out_f, RANK, generator=g) * 0.1


# (key stem in the file, down suffix, up suffix, alpha key or None, official target)
FORMATS = [
    ("diffusion_model.blocks.0.self_attn.q", ".lora_A.weight", ".lora_B.weight", ".alpha", "blocks.0.self_attn.q"),
    ("model.diffusion_model.blocks.1.cross_attn.v", ".lora_down.weight", ".lora_up.weight", ".alpha",
     "blocks.1.cross_attn.v"),
    ("lora_unet_blocks_1_cross_attn_o", ".lora_down.weight", ".lora_up.weight", ".alpha", "blocks.1.cross_attn.o"),
    ("lora_unet__blocks_0_self_attn_k", ".lora_down.weight", ".lora_up.weight", None, "blocks.0.self_attn.k"),
    ("lycoris_blocks_0_ffn_2", ".lora_down.weight", ".lora_up.weight", ".alpha", "blocks.0.ffn.2"),
    ("transformer.blocks.0.attn1.to_out.0", ".lora_A.weight", ".lora_B.weight", None, "blocks.0.self_attn.o"),
    ("blocks.1.attn2.to_q", ".lora_A.weight", ".lora_B.weight", None, "blocks.1.cross_attn.q"),
    ("blocks.1.ffn.net.0.proj", ".lora_A.weight", ".lora_B.weight", None, "blocks.1.ffn.0"),
    ("base_model.model.blocks.0.ffn.0", ".lora_A.default.weight", ".lora_B.default.weight", None, "blocks.0.ffn.0"),
    ("pipe.dit.blocks.1.self_attn.v", ".lora.down.weight", ".lora.up.weight", None, "blocks.1.self_attn.v"),
    ("diffusion_model.text_embedding.0", ".lora_A.weight", ".lora_B.weight", ".alpha", "text_embedding.0"),
    ("transformer.condition_embedder.time_proj", ".lora_A.weight", ".lora_B.weight", None, "time_projection.1"),
    ("transformer.proj_out", ".lora_A.weight", ".lora_B.weight", None, "head.head"),
]


@pytest.mark.parametrize("stem,down_s,up_s,alpha_s,target", FORMATS, ids=[f[0] for f in FORMATS])
def test_each_key_format_merges_to_the_hand_merged_weight(stem, down_s, up_s, alpha_s, target):
    model, sd = model_and_sd()
    weight = sd[target + ".weight"]
    down, up = low_rank(weight.shape[0], weight.shape[1], seed=len(stem))
    lora = {stem + down_s: down, stem + up_s: up}
    scale = 1.0
    if alpha_s:
        lora[stem + alpha_s] = torch.tensor(2.0)
        scale = 2.0 / RANK
    report = merge_lora(model, lora, strength=0.7)
    assert report.applied == [target] and not report.skipped and not report.unknown
    expected = weight + 0.7 * scale * (up @ down)
    torch.testing.assert_close(model.get_parameter(target + ".weight"), expected, rtol=0, atol=1e-6)
    for key, value in sd.items():                      # nothing else moved
        if key != target + ".weight":
            assert torch.equal(model.state_dict()[key], value), key


def test_diff_patches_norms_biases_and_bare_parameters():
    model, sd = model_and_sd()
    g = torch.Generator().manual_seed(5)
    diff_w, diff_b = torch.randn(256, generator=g), torch.randn(256, generator=g)
    diff_mod = torch.randn(1, 6, 256, generator=g)
    diff_full = torch.randn(256, 256, generator=g) * 0.01
    report = merge_lora(model, {"diffusion_model.blocks.0.norm3.diff": diff_w,
                                "diffusion_model.blocks.0.norm3.diff_b": diff_b,
                                "diffusion_model.blocks.1.modulation.diff": diff_mod,
                                "diffusion_model.blocks.1.self_attn.q.diff": diff_full}, strength=2.0)
    assert sorted(report.applied) == ["blocks.0.norm3", "blocks.1.modulation", "blocks.1.self_attn.q"]
    torch.testing.assert_close(model.blocks[0].norm3.weight, sd["blocks.0.norm3.weight"] + 2 * diff_w)
    torch.testing.assert_close(model.blocks[0].norm3.bias, sd["blocks.0.norm3.bias"] + 2 * diff_b)
    torch.testing.assert_close(model.blocks[1].modulation, sd["blocks.1.modulation"] + 2 * diff_mod)
    torch.testing.assert_close(model.blocks[1].self_attn.q.weight, sd["blocks.1.self_attn.q.weight"] + 2 * diff_full)


def full_lora(model: nn.Module, seed=0) -> dict[str, torch.Tensor]:
    """A LoRA on q/k/v/o of both attentions and the FFN of every block (the usual Wan targets)."""
    lora = {}
    for i, block in enumerate(model.blocks):
        for name in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                     "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"):
            layer = block.get_submodule(name)
            down, up = low_rank(layer.out_features, layer.in_features, seed=seed + 31 * i + len(name))
            lora[f"diffusion_model.blocks.{i}.{name}.lora_A.weight"] = down
            lora[f"diffusion_model.blocks.{i}.{name}.lora_B.weight"] = up
            lora[f"diffusion_model.blocks.{i}.{name}.alpha"] = torch.tensor(float(RANK))
    return lora


def inputs(cfg):
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([600.0]), torch.randn(1, 5, cfg.text_dim, generator=g)


def test_merged_model_equals_a_model_loaded_from_hand_merged_weights_and_unmerges():
    model, sd = model_and_sd()
    lora = full_lora(model)
    hand = dict(sd)
    for key in lora:
        if key.endswith(".lora_A.weight"):
            target = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
            hand[target + ".weight"] = sd[target + ".weight"] + 0.8 * (lora[key.replace("lora_A", "lora_B")] @ lora[key])
    x, t, ctx = inputs(model.config)
    merge_lora(model, lora, 0.8)
    torch.testing.assert_close(model(x, t, ctx), WanDiT.from_state_dict(hand)(x, t, ctx), rtol=1e-5, atol=1e-5)
    merge_lora(model, lora, -0.8)
    for key, value in sd.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_attach_equals_merge_and_detaches_exactly():
    model, sd = model_and_sd()
    lora = full_lora(model, seed=3)
    x, t, ctx = inputs(model.config)
    before = model(x, t, ctx)
    attached = attach_lora(model, lora, 1.3)
    assert len(attached.report.applied) == 20
    with_hooks = model(x, t, ctx)
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value)          # weights untouched
    attached.remove()
    assert torch.equal(model(x, t, ctx), before)
    merge_lora(model, lora, 1.3)
    torch.testing.assert_close(with_hooks, model(x, t, ctx), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_hooks, before)


def test_fp8_layers_are_dequantized_patched_and_requantized():
    model, sd = model_and_sd(weight_dtype=torch.float8_e4m3fn, dtype=torch.float32)
    q = model.blocks[0].self_attn.q
    assert q.weight.dtype == torch.float8_e4m3fn
    stored = q.dequantize()
    down, up = low_rank(256, 256, seed=9)
    merge_lora(model, {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": down,
                       "diffusion_model.blocks.0.self_attn.q.lora_B.weight": up})
    assert q.weight.dtype == torch.float8_e4m3fn
    expected = stored + up @ down
    err = (q.dequantize() - expected).abs().max()
    assert err <= 0.07 * expected.abs().max()                        # fp8 rounding, not a lost update
    assert (q.dequantize() - stored).abs().max() > 5 * err


class ToyInt8Linear(nn.Module):
    """The int8 layer protocol (int8 weight + per-row scale, dequantize/requantize), test-local."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.zeros(linear.weight.shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(linear.out_features, 1))
        self.bias = linear.bias
        self.requantize(linear.weight.float())

    def dequantize(self, dtype=torch.float32):
        return (self.weight.float() * self.scale).to(dtype)

    def requantize(self, weight, seed=0):
        self.scale = weight.abs().amax(1, keepdim=True) / 127
        self.weight = (weight / self.scale).round().clamp(-127, 127).to(torch.int8)

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize(x.dtype), self.bias)


def test_int8_style_layers_are_patched_through_their_dequantize_requantize_pair():
    model, sd = model_and_sd()
    model.blocks[1].ffn[0] = ToyInt8Linear(model.blocks[1].ffn[0])
    stored = model.blocks[1].ffn[0].dequantize()
    down, up = low_rank(512, 256, seed=4)
    report = merge_lora(model, {"lora_unet_blocks_1_ffn_0.lora_down.weight": down,
                                "lora_unet_blocks_1_ffn_0.lora_up.weight": up,
                                "lora_unet_blocks_1_ffn_0.alpha": torch.tensor(2.0)})
    assert report.applied == ["blocks.1.ffn.0"]
    layer = model.blocks[1].ffn[0]
    assert layer.weight.dtype == torch.int8
    expected = stored + 0.5 * (up @ down)
    assert (layer.dequantize() - expected).abs().max() <= 0.6 * layer.scale.max()   # half a step of the new grid


def test_image_keys_on_a_t2v_model_unknown_keys_and_wrong_models_are_reported():
    model, _ = model_and_sd()
    down, up = low_rank(256, 256, seed=1)
    lora = {"diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": down,
            "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight": up,
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight": down,
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": up,
            "diffusion_model.blocks.0.self_attn.k.hada_w1_a": down,
            "diffusion_model.blocks.0.self_attn.v.lora_mid.weight": down,
            "some.random.tensor": down}
    report = merge_lora(model, lora)
    assert report.applied == ["blocks.0.self_attn.q"]
    assert report.skipped == {"blocks.0.cross_attn.k_img": "image-to-video layer; this is a text-to-video model",
                              "blocks.0.self_attn.k": "LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b"}
    assert sorted(report.unknown) == ["diffusion_model.blocks.0.self_attn.v.lora_mid.weight", "some.random.tensor"]
    assert "1 layer(s) patched" in report.summary() and "image-to-video" in report.summary()
    big_down, big_up = low_rank(1536, 1536, seed=2)              # a LoRA made for the 1.3B model
    with pytest.raises(LoraError, match="does not fit the layer's weight"):
        merge_lora(model, {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": big_down,
                           "diffusion_model.blocks.0.self_attn.q.lora_B.weight": big_up})
    with pytest.raises(LoraError, match="no layer matched"):
        attach_lora(model, {"unrelated.weight": down})


def test_i2v_lora_reaches_the_image_branch():
    model, sd = model_and_sd("i2v")
    down, up = low_rank(256, 256, seed=6)
    lora = {"diffusion_model.blocks.1.cross_attn.v_img.lora_A.weight": down,
            "diffusion_model.blocks.1.cross_attn.v_img.lora_B.weight": up,
            "transformer.blocks.0.attn2.add_k_proj.lora_A.weight": down,
            "transformer.blocks.0.attn2.add_k_proj.lora_B.weight": up}
    parsed = parse_lora(lora, model)
    assert sorted(parsed.patches) == ["blocks.0.cross_attn.k_img", "blocks.1.cross_attn.v_img"]
    merge_lora(model, parsed, 1.0)
    torch.testing.assert_close(model.blocks[1].cross_attn.v_img.weight, sd["blocks.1.cross_attn.v_img.weight"] + up @ down)
