"""Wan 2.1 DiT configs: full-size module trees on `meta` against the spec's key table, detection
from shapes (blocks, widths, heads, model type) and the one place prefixes are stripped."""

from __future__ import annotations

import json
import math

import pytest
import torch
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan import config as wc
from slipstream.models.wan.dit import WanDiT

# The spec's table for T2V-1.3B (docs: shared/specs/wan.md §4.4), written out independently of the code.
NON_BLOCK_1_3B = {
    "patch_embedding.weight": (1536, 16, 1, 2, 2), "patch_embedding.bias": (1536,),
    "text_embedding.0.weight": (1536, 4096), "text_embedding.0.bias": (1536,),
    "text_embedding.2.weight": (1536, 1536), "text_embedding.2.bias": (1536,),
    "time_embedding.0.weight": (1536, 256), "time_embedding.0.bias": (1536,),
    "time_embedding.2.weight": (1536, 1536), "time_embedding.2.bias": (1536,),
    "time_projection.1.weight": (9216, 1536), "time_projection.1.bias": (9216,),
    "head.modulation": (1, 2, 1536), "head.head.weight": (64, 1536), "head.head.bias": (64,),
}


def block_keys(dim: int, ffn: int, image: bool) -> dict[str, tuple[int, ...]]:
    keys = {"modulation": (1, 6, dim), "norm3.weight": (dim,), "norm3.bias": (dim,),
            "ffn.0.weight": (ffn, dim), "ffn.0.bias": (ffn,), "ffn.2.weight": (dim, ffn), "ffn.2.bias": (dim,)}
    for attn in ("self_attn", "cross_attn"):
        for lin in ("q", "k", "v", "o"):
            keys[f"{attn}.{lin}.weight"] = (dim, dim)
            keys[f"{attn}.{lin}.bias"] = (dim,)
        keys[f"{attn}.norm_q.weight"] = (dim,)
        keys[f"{attn}.norm_k.weight"] = (dim,)
    if image:
        keys.update({"cross_attn.k_img.weight": (dim, dim), "cross_attn.k_img.bias": (dim,),
                     "cross_attn.v_img.weight": (dim, dim), "cross_attn.v_img.bias": (dim,),
                     "cross_attn.norm_k_img.weight": (dim,)})
    return keys


def spec_table(dim: int, ffn: int, layers: int, image: bool) -> dict[str, tuple[int, ...]]:
    scale = dim / 1536
    table = {k: tuple(int(s * scale) if s in (1536, 9216) else s for s in v) for k, v in NON_BLOCK_1_3B.items()}
    if image:
        table["patch_embedding.weight"] = (dim, 36, 1, 2, 2)
        table.update({"img_emb.proj.0.weight": (1280,), "img_emb.proj.0.bias": (1280,),
                      "img_emb.proj.1.weight": (1280, 1280), "img_emb.proj.1.bias": (1280,),
                      "img_emb.proj.3.weight": (dim, 1280), "img_emb.proj.3.bias": (dim,),
                      "img_emb.proj.4.weight": (dim,), "img_emb.proj.4.bias": (dim,)})
    for i in range(layers):
        table.update({f"blocks.{i}.{k}": v for k, v in block_keys(dim, ffn, image).items()})
    return table


FULL = [
    (wc.WAN21_T2V_1_3B, 825, 1_418_996_800, spec_table(1536, 8960, 30, False)),
    (wc.WAN21_T2V_14B, 1095, 14_288_491_584, spec_table(5120, 13824, 40, False)),
    (wc.WAN21_I2V_14B_480P, 1303, 16_394_878_784, spec_table(5120, 13824, 40, True)),
    (wc.WAN21_I2V_14B_720P, 1303, 16_394_878_784, spec_table(5120, 13824, 40, True)),
    (wc.WAN21_FLF2V_14B, 1304, 16_395_536_704,
     {**spec_table(5120, 13824, 40, True), "img_emb.emb_pos": (1, 514, 1280)}),
]


@pytest.mark.parametrize("cfg,count,params,table", FULL, ids=[c[0].name for c in FULL])
def test_meta_model_has_exactly_the_spec_keys_and_shapes(cfg, count, params, table):
    model = WanDiT.build_meta(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(v.device.type == "meta" for v in model.state_dict().values())
    assert len(shapes) == count
    assert shapes == table
    assert sum(math.prod(s) for s in shapes.values()) == params


def test_spec_config_numbers():
    c = wc.WAN21_T2V_1_3B
    assert (c.dim, c.ffn_dim, c.num_heads, c.num_layers, c.head_dim) == (1536, 8960, 12, 30, 128)
    assert c.rope_axes == (44, 42, 42)
    assert wc.WAN21_I2V_14B_480P.cond_channels == 20 and wc.WAN21_T2V_14B.cond_channels == 0
    assert wc.WAN21_I2V_14B_480P.same_architecture(wc.WAN21_I2V_14B_720P)
    assert not wc.WAN21_T2V_14B.same_architecture(wc.WAN21_I2V_14B_480P)


@pytest.mark.parametrize("cfg", [c[0] for c in FULL], ids=[c[0].name for c in FULL])
def test_detection_from_shapes_recovers_every_full_config(cfg):
    found = wc.detect_config(WanDiT.expected_shapes(cfg))
    assert found.same_architecture(cfg)
    assert found.name in (cfg.name, "Wan2.1-I2V-14B (480P/720P)")


def test_detected_names():
    assert wc.detect_config(WanDiT.expected_shapes(wc.WAN21_T2V_1_3B)).name == "Wan2.1-T2V-1.3B"
    assert wc.detect_config(WanDiT.expected_shapes(wc.WAN21_I2V_14B_720P)).name == "Wan2.1-I2V-14B (480P/720P)"
    assert wc.detect_config(WanDiT.expected_shapes(wc.tiny())).name == "custom"


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
def test_tiny_config_keeps_the_real_structure_and_is_detected(model_type):
    cfg = wc.tiny(model_type, num_layers=3)
    assert cfg.head_dim == 128 and cfg.rope_axes == (44, 42, 42)
    assert cfg.model_type == model_type and cfg.in_dim == (16 if model_type == "t2v" else 36)
    found = wc.detect_config(WanDiT.expected_shapes(cfg))
    assert found.same_architecture(cfg)


def test_widths_layers_and_type_come_from_the_shapes():
    cfg = wc.WanDiTConfig("x", "i2v", dim=384, ffn_dim=1000, num_heads=3, num_layers=5, in_dim=36,
                          text_dim=64, clip_dim=96, freq_dim=32)
    found = wc.detect_config(WanDiT.expected_shapes(cfg))
    assert found.same_architecture(cfg)


def test_head_count_from_metadata_else_width_over_128():
    cfg = wc.WanDiTConfig("x", "t2v", dim=192, ffn_dim=64, num_heads=6, num_layers=1)
    shapes = WanDiT.expected_shapes(cfg)
    assert wc.detect_config(shapes, {"num_heads": "6"}).num_heads == 6
    assert wc.detect_config(shapes, {"config": json.dumps({"num_heads": 6, "dim": 192})}).num_heads == 6
    assert wc.detect_config(shapes, num_heads=3).num_heads == 3
    with pytest.raises(CheckpointError, match="num_heads"):
        wc.detect_config(shapes)           # 192 is not a multiple of 128 and nothing says otherwise
    assert wc.detect_config(WanDiT.expected_shapes(wc.WAN21_T2V_14B)).num_heads == 40


def test_count_blocks_uses_the_highest_index():
    assert wc.count_blocks(["blocks.0.a", "blocks.11.b", "blocks.3.c", "head.x", "blocksX.99"]) == 12
    assert wc.count_blocks(["head.x"]) == 0


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model.", "model.", "video_model."])
def test_every_known_prefix_is_stripped(prefix):
    shapes = WanDiT.expected_shapes(wc.tiny())
    stripped, found = wc.strip_dit_prefix({prefix + k: v for k, v in shapes.items()})
    assert found == prefix
    assert stripped == shapes


def test_all_in_one_file_keeps_only_the_dit_and_drops_markers():
    shapes = WanDiT.expected_shapes(wc.tiny())
    sd = {"model.diffusion_model." + k: v for k, v in shapes.items()}
    sd.update({"vae.decoder.conv1.weight": (1,), "text_encoders.umt5xxl.transformer.shared.weight": (1,),
               "scaled_fp8": (0,), "model.diffusion_model.scaled_fp8": (0,)})
    stripped, prefix = wc.strip_dit_prefix(sd)
    assert prefix == "model.diffusion_model." and stripped == shapes


@pytest.mark.parametrize("keys,hint", [
    (["decoder.conv1.weight", "encoder.conv1.weight"], "VAE"),
    (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "text encoder"),
    (["visual.transformer.0.attn.to_qkv.weight"], "CLIP vision"),
    (["diffusion_model.blocks.0.self_attn.q.lora_A.weight"], "LoRA"),
    (["blocks.0.attn1.to_q.weight", "scale_shift_table"], "Diffusers"),
    (["something.else"], "head.modulation"),
])
def test_non_dit_files_say_what_they_are(keys, hint):
    with pytest.raises(CheckpointError, match=hint):
        wc.strip_dit_prefix({k: torch.zeros(1) for k in keys}, "file.safetensors")


def test_wan22_5b_and_bad_configs_are_refused():
    shapes = dict(WanDiT.expected_shapes(wc.tiny()))
    shapes["patch_embedding.weight"] = (256, 48, 1, 2, 2)
    shapes["head.head.weight"] = (48 * 4, 256)
    with pytest.raises(CheckpointError, match="Wan 2.2"):
        wc.detect_config(shapes)
    with pytest.raises(ValueError, match="divisible"):
        wc.WanDiTConfig("x", "t2v", dim=100, ffn_dim=1, num_heads=3, num_layers=1)
    with pytest.raises(ValueError, match="model_type"):
        wc.WanDiTConfig("x", "v2v", dim=128, ffn_dim=1, num_heads=1, num_layers=1)
