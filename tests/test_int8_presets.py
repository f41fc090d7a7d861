"""Model families: detection from key fixtures, path-component exclusions, model_type mismatches.

The fixtures list each family's Linear modules as ComfyUI's implementation names them (block
indices 0, 1 and, where a list names a late layer, 35), plus the non-Linear marker tensors.
"""

from __future__ import annotations

import pytest
import torch
from slipstream.kernels.quant_layer import ExclusionRules, QuantPlan, convert_linears
from slipstream.models import quant_presets as P


def _blocks(prefix, names, n=2):
    return [f"{prefix}.{i}.{name}" for i in range(n) for name in names]


LINEARS = {
    "flux2": ["img_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
              "txt_in", "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
              "single_stream_modulation.lin", "final_layer.linear", "final_layer.adaLN_modulation.1",
              *_blocks("double_blocks", ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv",
                                         "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"]),
              *_blocks("single_blocks", ["linear1", "linear2"])],
    "flux1": ["img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
              "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "final_layer.linear",
              "final_layer.adaLN_modulation.1",
              *_blocks("double_blocks", ["img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                                         "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"]),
              *_blocks("single_blocks", ["linear1", "linear2", "modulation.lin"])],
    "chroma": ["img_in", "txt_in", "distilled_guidance_layer.in_proj", "distilled_guidance_layer.out_proj",
               *_blocks("distilled_guidance_layer.layers", ["in_layer", "out_layer"]), "final_layer.linear",
               *_blocks("double_blocks", ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv",
                                          "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"]),
               *_blocks("single_blocks", ["linear1", "linear2"])],
    "z-image": ["x_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1", "final_layer.linear",
                "final_layer.adaLN_modulation.1",
                *_blocks("noise_refiner", ["attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2",
                                           "feed_forward.w3", "adaLN_modulation.0"]),
                *_blocks("context_refiner", ["attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2",
                                             "feed_forward.w3"]),
                *_blocks("layers", ["attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2",
                                    "feed_forward.w3", "adaLN_modulation.0"])],
    "wan": ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
            "head.head", "img_emb.proj.1", "img_emb.proj.3", "audio_adapter.audio_proj.proj1",
            *_blocks("blocks", ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                                "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img",
                                "cross_attn.v_img", "ffn.0", "ffn.2"])],
    "ltx2": ["patchify_proj", "adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
             "adaln_single.linear", "caption_projection.linear_1", "caption_projection.linear_2", "audio_patchify_proj",
             "audio_adaln_single.linear", "av_ca_video_scale_shift_adaln_single.linear",
             "av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_1", "audio_caption_projection.linear_1",
             "proj_out", "audio_proj_out",
             *_blocks("transformer_blocks", ["attn1.to_q", "attn1.to_out.0", "attn2.to_k", "audio_attn1.to_q",
                                             "audio_to_video_attn.to_v", "ff.net.0.proj", "ff.net.2",
                                             "audio_ff.net.0.proj"])],
    "qwen": ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2", "img_in",
             "txt_in", "norm_out.linear", "proj_out",
             *_blocks("transformer_blocks", ["img_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mod.1",
                                             "attn.to_q", "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out"])],
    "ernie": ["text_proj", "time_embedding.linear_1", "time_embedding.linear_2", "adaLN_modulation.1",
              "final_norm.linear", "final_linear",
              *[f"layers.{i}.{n}" for i in (0, 1, 3, 35) for n in
                ("self_attention.to_q", "self_attention.to_k", "self_attention.to_v", "self_attention.to_out.0",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.linear_fc2")]],
    "anima": ["x_embedder.proj.1", "t_embedder.1.linear_1", "t_embedder.1.linear_2", "final_layer.linear",
              "final_layer.adaln_modulation.1", "llm_adapter.blocks.0.cross_attn.q_proj",
              "llm_adapter.blocks.0.mlp.0",
              *_blocks("blocks", ["self_attn.q_proj", "self_attn.output_proj", "cross_attn.k_proj", "mlp.layer1",
                                  "mlp.layer2", "adaln_modulation_self_attn.1", "adaln_modulation_mlp.2"])],
    "sdxl": ["time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2", "input_blocks.1.0.emb_layers.1",
             "input_blocks.4.1.proj_in", "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
             "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj", "input_blocks.4.1.proj_out",
             "middle_block.1.transformer_blocks.0.attn2.to_k", "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0"],
}
OTHER_KEYS = {
    "flux2": ["double_blocks.0.img_attn.norm.key_norm.scale"],
    "flux1": ["double_blocks.0.img_attn.norm.key_norm.scale"],
    "chroma": ["distilled_guidance_layer.norms.0.scale"],
    "z-image": ["cap_embedder.0.weight", "x_pad_token", "cap_pad_token"],
    "wan": ["head.modulation", "patch_embedding.weight", "blocks.0.modulation"],
    "ltx2": ["scale_shift_table"],
    "qwen": ["txt_norm.weight"],
    "ernie": ["x_embedder.proj.weight", "layers.0.adaLN_sa_ln.weight"],
    "anima": ["t_embedding_norm.weight"],
    "sdxl": ["input_blocks.0.0.weight", "out.2.weight"],
}
# What each family must keep float (a sample), and what it must quantize.
MUST_STAY_FLOAT = {
    "flux2": ["img_in", "double_stream_modulation_img.lin", "final_layer.linear"],
    "flux1": ["vector_in.in_layer", "txt_in", "final_layer.adaLN_modulation.1"],
    "chroma": ["distilled_guidance_layer.layers.1.out_layer", "img_in"],
    "z-image": ["layers.0.attention.qkv", "noise_refiner.1.feed_forward.w2", "layers.1.adaLN_modulation.0"],
    "wan": ["head.head", "time_projection.1", "img_emb.proj.3", "text_embedding.0"],
    "ltx2": ["av_ca_video_scale_shift_adaln_single.linear", "proj_out", "audio_proj_out", "patchify_proj"],
    "qwen": ["norm_out.linear", "time_text_embed.timestep_embedder.linear_1"],
    "ernie": ["layers.0.mlp.gate_proj", "layers.35.self_attention.to_q", "final_norm.linear", "text_proj"],
    "anima": ["blocks.1.adaln_modulation_mlp.2", "llm_adapter.blocks.0.cross_attn.q_proj", "x_embedder.proj.1"],
    "sdxl": ["input_blocks.4.1.proj_in", "label_emb.0.0", "input_blocks.1.0.emb_layers.1"],
}
MUST_QUANTIZE = {
    "flux2": ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"],
    "flux1": ["double_blocks.1.img_mod.lin", "single_blocks.0.linear1"],
    "chroma": ["double_blocks.0.txt_mlp.0"],
    "z-image": ["layers.1.attention.qkv"],
    "wan": ["blocks.0.self_attn.q", "blocks.1.cross_attn.v_img", "blocks.1.ffn.2"],
    "ltx2": ["transformer_blocks.1.attn1.to_q", "transformer_blocks.0.audio_ff.net.0.proj"],
    "qwen": ["transformer_blocks.0.img_mod.1", "transformer_blocks.1.attn.to_add_out"],
    "ernie": ["layers.3.self_attention.to_q", "layers.1.mlp.linear_fc2"],
    "anima": ["blocks.0.self_attn.q_proj", "blocks.1.mlp.layer2"],
    "sdxl": ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "middle_block.1.transformer_blocks.0.attn2.to_k"],
}


def family_keys(family: str, prefix: str = "") -> list[str]:
    keys = [f"{prefix}{m}.weight" for m in LINEARS[family]] + [prefix + k for k in OTHER_KEYS[family]]
    return sorted(set(keys))


@pytest.mark.parametrize("family", sorted(LINEARS))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_auto_detects_each_family(family, prefix):
    found = P.detect(family_keys(family, prefix))
    assert found.family is not None and found.family.name == family
    assert found.prefix == prefix
    res = P.resolve("auto", family_keys(family, prefix))
    assert res.name == family and "detected" in res.message and found.family.title in res.message


@pytest.mark.parametrize("family", sorted(LINEARS))
def test_each_exclusion_pattern_names_a_real_module(family):
    """A pattern that matches nothing in the family's own module tree is a stale list."""
    rules = P.BY_NAME[family].rules()
    modules = LINEARS[family] + [k.rsplit(".", 1)[0] for k in OTHER_KEYS[family] if "." in k]
    unused = [p for p in rules.patterns if not any(ExclusionRules.of([p]).match(m) for m in modules)]
    allowed_unused = {"chroma": {"nerf_image_embedder", "nerf_blocks", "nerf_final_layer_conv"},  # Chroma Radiance
                      "wan": {"patch_embedding"},                                  # a Conv3d, listed for clarity
                      "ernie": {"x_embedder"},
                      "ltx2": set()}
    assert set(unused) <= allowed_unused.get(family, set()), unused


@pytest.mark.parametrize("family", sorted(LINEARS))
def test_presets_keep_sensitive_layers_float_and_quantize_the_blocks(family):
    rules = P.BY_NAME[family].rules()
    for name in MUST_STAY_FLOAT[family]:
        assert rules.match(name), f"{family}: {name} should stay float"
    for name in MUST_QUANTIZE[family]:
        assert rules.match(name) is None, f"{family}: {name} should be quantized"


def test_path_components_not_substrings():
    rules = ExclusionRules.of(["layers.3", "proj_out", "*_embedder", "blocks.0."])
    assert rules.match("layers.3.attention.qkv") == "layers.3"
    assert rules.match("diffusion_model.layers.3.mlp") == "layers.3"
    assert rules.match("layers.35.attention.qkv") is None
    assert rules.match("layers.30") is None
    assert rules.match("proj_out") == "proj_out" and rules.match("x.proj_out") == "proj_out"
    assert rules.match("proj_out_2") is None and rules.match("audio_proj_out") is None
    assert rules.match("t_embedder.mlp.0") == "*_embedder" and rules.match("embedder") is None
    assert rules.match("blocks.0.ffn.0") == "blocks.0" and rules.match("blocks.10.ffn.0") is None
    with pytest.raises(ValueError, match="empty"):
        ExclusionRules.of(["blocks..0"])


def test_mismatched_model_type_is_an_error_that_names_the_real_family():
    with pytest.raises(P.ModelTypeError, match=r"'flux2' \(Flux.2\) does not match.*Wan 2.1/2.2.*Choose 'wan'"):
        P.resolve("flux2", family_keys("wan"))
    with pytest.raises(P.ModelTypeError, match="Valid choices: auto, flux2"):
        P.resolve("flux3", family_keys("wan"))


def test_chosen_type_confirmed_or_unconfirmed():
    assert "confirmed" in P.resolve("wan", family_keys("wan")).message
    res = P.resolve("wan", ["some.other.weight"])
    assert res.name == "wan" and "could not confirm" in res.message


def test_unknown_architecture_uses_the_conservative_union():
    res = P.resolve("auto", ["net.fc1.weight", "net.fc2.weight"])
    assert res.name == "unknown"
    for family in P.FAMILIES:
        for pattern in family.excluded:
            assert pattern in res.rules.patterns


def test_converter_applies_a_preset_to_a_real_module():
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
    for block in model.blocks:
        block.ffn = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    model.head = torch.nn.Module()
    model.head.head = torch.nn.Linear(32, 8)
    model.gate = torch.nn.Linear(32, 1)
    plan = QuantPlan(on_the_fly=True, exclude=P.BY_NAME["wan"].rules())
    report = convert_linears(model, plan)
    from slipstream.kernels.int8 import Int8Linear

    assert isinstance(model.blocks[1].ffn[2], Int8Linear)
    assert type(model.head.head) is torch.nn.Linear and type(model.gate) is torch.nn.Linear
    assert report.excluded() == {"head.head": "head"}
    assert report.entries["gate"] == ("float", "in or out features of 1")
    assert "4 int8 Linear layers (0 pre-quantized, 4 quantized on the fly)" in report.summary()
