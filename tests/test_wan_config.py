"""Wan 2.1 / 2.2 DiT configs: full-size module trees on `meta` against the official key table, detection
from shapes (blocks, widths, heads, model type) and the one place prefixes are stripped."""

from __future__ import annotations

import json
import math

import pytest
import torch
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan import config as wc
from slipstream.models.wan.dit import WanDiT

# The official T2V-1.3B key table, written out independently of the code.
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


def test_a_48_channel_output_without_48_inputs_and_bad_configs_are_refused():
    shapes = dict(WanDiT.expected_shapes(wc.tiny()))
    shapes["head.head.weight"] = (48 * 4, 256)                      # 16 in, 48 out: no released model
    with pytest.raises(CheckpointError, match="TI2V-5B"):
        wc.detect_config(shapes)
    with pytest.raises(ValueError, match="divisible"):
        wc.WanDiTConfig("x", "t2v", dim=100, ffn_dim=1, num_heads=3, num_layers=1)
    with pytest.raises(ValueError, match="model_type"):
        wc.WanDiTConfig("x", "v2v", dim=128, ffn_dim=1, num_heads=1, num_layers=1)


# ------------------------------------------------------------------------------------ Wan 2.2
def test_ti2v_5b_full_tree_on_meta_and_its_numbers():
    cfg = wc.WAN22_TI2V_5B
    shapes = WanDiT.expected_shapes(cfg)
    # official wan/configs/wan_ti2v_5B.py: dim 3072, ffn 14336, 24 heads, 30 layers; 48 latent channels
    assert shapes["patch_embedding.weight"] == (3072, 48, 1, 2, 2)
    assert shapes["head.head.weight"] == (48 * 4, 3072)
    assert shapes["blocks.29.ffn.0.weight"] == (14336, 3072) and "blocks.30.ffn.0.weight" not in shapes
    assert not any(k.startswith("img_emb") or "k_img" in k for k in shapes)
    assert 4.9e9 < sum(math.prod(s) for s in shapes.values()) < 5.1e9
    assert (cfg.variant, cfg.generation, cfg.vae_generation, cfg.vae_stride) == ("ti2v-5B", "2.2", "2.2", (4, 16, 16))
    assert cfg.head_dim == 128


def test_a14b_i2v_expert_has_36_channels_and_no_clip_branch():
    cfg = wc.WAN22_I2V_A14B
    shapes = WanDiT.expected_shapes(cfg)
    assert shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2)
    assert not any(k.startswith("img_emb") or "k_img" in k for k in shapes)
    assert len(shapes) == 1095                       # the T2V-14B key set, only patch_embedding is wider
    assert cfg.has_image_input and not cfg.has_clip and cfg.cond_channels == 20 and cfg.vae_generation == "2.1"


@pytest.mark.parametrize("cfg,hint,variant,generation,boundary,expert", [
    (wc.WAN22_TI2V_5B, "", "ti2v-5B", "2.2", None, None),
    (wc.WAN22_I2V_A14B, "", "i2v-A14B", "2.2", 0.900, None),
    (wc.WAN22_I2V_A14B, "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", "i2v-A14B", "2.2", 0.900, "low_noise"),
    (wc.WAN21_T2V_14B, "", "t2v-14B", "2.1", None, None),
    (wc.WAN21_T2V_14B, "wan2.2_t2v_high_noise_14B_fp16.safetensors", "t2v-A14B", "2.2", 0.875, "high_noise"),
    (wc.WAN21_T2V_14B, "Wan2_2-T2V-A14B-LOW_fp8_e4m3fn_scaled_KJ.safetensors", "t2v-A14B", "2.2", 0.875, "low_noise"),
    (wc.WAN21_FLF2V_14B, "", "flf2v-14B", "2.1", None, None),
    (wc.WAN21_I2V_14B_480P, "", "i2v-14B", "2.1", None, None),
])
def test_variant_generation_and_boundary_are_labelled(cfg, hint, variant, generation, boundary, expert):
    found = wc.detect_config(WanDiT.expected_shapes(cfg), what=hint or "checkpoint")
    assert found.same_architecture(cfg)
    assert (found.variant, found.generation, found.boundary, found.expert) == (variant, generation, boundary, expert)


def test_hints_come_from_marker_keys_metadata_and_the_file_name():
    shapes = WanDiT.expected_shapes(wc.WAN21_T2V_14B)
    assert wc.file_hint(["model_type.Wan2_2-T2V-A14B"], None, "x.safetensors").count("wan2_2") == 1
    assert wc.detect_config(shapes, hint=wc.file_hint(["model_type.Wan2_2-T2V-A14B"])).variant == "t2v-A14B"
    assert wc.detect_config(shapes, {"model_type": "wan2.2 t2v low_noise"}).expert == "low_noise"
    assert wc.detect_config(shapes, what="models/wan2.2/wan2.1_t2v_14B_bf16.safetensors").generation == "2.1"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_tiny_wan22_files_load_from_official_and_comfy_layouts(tmp_path, prefix):
    from safetensors.torch import save_file
    from slipstream.models.wan.dit import random_state_dict

    for cfg in (wc.tiny("ti2v", text_dim=64), wc.tiny("i2v", text_dim=64, image_context=False)):
        path = tmp_path / f"{cfg.model_type}{cfg.has_clip}.safetensors"
        save_file({prefix + k: v for k, v in random_state_dict(cfg).items()}, str(path))
        model = WanDiT.from_file(str(path))
        assert model.config.same_architecture(cfg) and model.config.generation == "2.2"


def test_kijai_fp8_scaled_ti2v_layout_loads_and_keeps_its_scales(tmp_path):
    from safetensors.torch import save_file
    from slipstream.models.wan.dit import random_state_dict

    cfg = wc.tiny("ti2v", text_dim=64)
    fp8 = torch.float8_e4m3fn
    scaled = {"scaled_fp8": torch.zeros(0, dtype=fp8), "model_type.Wan2_2-TI2V-5B": torch.zeros(0)}
    for key, value in random_state_dict(cfg).items():
        if key.startswith("blocks.") and key.endswith(".weight") and value.dim() == 2:
            scale = value.abs().max() / 448.0
            scaled[key] = (value / scale).to(fp8)
            scaled[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            scaled[key] = value
    path = tmp_path / "Wan2_2-TI2V-5B_fp8_e4m3fn_scaled_KJ.safetensors"
    save_file(scaled, str(path))
    model = WanDiT.from_file(str(path), dtype=torch.float32)
    assert model.config.variant == "custom" and model.config.model_type == "ti2v"   # tiny widths: no release name
    assert model.blocks[0].ffn[0].weight.dtype == fp8 and model.blocks[0].ffn[0].weight_scale is not None


@pytest.mark.parametrize("key,what", [
    ("blocks.0.casual_audio_encoder.encoder.final_linear.weight", "S2V"),
    ("face_adapter.fuser_blocks.0.k_norm.weight", "Animate"),
    ("control_adapter.conv.weight", "Fun Camera"),
])
def test_wan_models_we_cannot_run_say_what_they_are(key, what):
    shapes = dict(WanDiT.expected_shapes(wc.tiny()))
    shapes[key] = (4,)
    with pytest.raises(CheckpointError, match=what):
        wc.detect_config(shapes)
