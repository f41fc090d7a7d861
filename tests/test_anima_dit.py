"""The Anima DiT, LLM adapter and Qwen3 encoder: real key names and shapes, loading, forward contract."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from slipstream.models.anima.dit import AnimaConfig, AnimaDiT, config_from_state_dict, tiny_config
from slipstream.models.anima.qwen3 import Qwen3Config, Qwen3Encoder
from slipstream.models.anima.tiny import TINY_QWEN, randomize, tiny_dit
from slipstream.models.checkpoint import CheckpointError, load_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")

# The shapes ComfyUI's Anima has for the released 2B checkpoint.
SPEC_SHAPES = {
    "x_embedder.proj.1.weight": (2048, 68),
    "t_embedder.1.linear_1.weight": (2048, 2048),
    "t_embedder.1.linear_2.weight": (6144, 2048),
    "t_embedding_norm.weight": (2048,),
    "blocks.27.self_attn.q_proj.weight": (2048, 2048),
    "blocks.0.self_attn.output_proj.weight": (2048, 2048),
    "blocks.0.self_attn.k_norm.weight": (128,),
    "blocks.0.cross_attn.q_proj.weight": (2048, 2048),
    "blocks.0.cross_attn.k_proj.weight": (2048, 1024),
    "blocks.0.cross_attn.v_proj.weight": (2048, 1024),
    "blocks.0.cross_attn.q_norm.weight": (128,),
    "blocks.0.mlp.layer1.weight": (8192, 2048),
    "blocks.0.mlp.layer2.weight": (2048, 8192),
    "blocks.0.adaln_modulation_cross_attn.1.weight": (256, 2048),
    "blocks.0.adaln_modulation_mlp.2.weight": (6144, 256),
    "final_layer.linear.weight": (64, 2048),
    "final_layer.adaln_modulation.1.weight": (256, 2048),
    "final_layer.adaln_modulation.2.weight": (4096, 256),
    "llm_adapter.embed.weight": (32128, 1024),
    "llm_adapter.blocks.5.self_attn.o_proj.weight": (1024, 1024),
    "llm_adapter.blocks.0.cross_attn.k_proj.weight": (1024, 1024),
    "llm_adapter.blocks.0.cross_attn.q_norm.weight": (64,),
    "llm_adapter.blocks.0.norm_mlp.weight": (1024,),
    "llm_adapter.blocks.0.mlp.0.weight": (4096, 1024),
    "llm_adapter.blocks.0.mlp.0.bias": (4096,),
    "llm_adapter.blocks.0.mlp.2.weight": (1024, 4096),
    "llm_adapter.out_proj.bias": (1024,),
    "llm_adapter.norm.weight": (1024,),
}


def test_full_config_matches_the_released_layout_on_meta():
    with torch.device("meta"):
        sd = AnimaDiT(AnimaConfig()).state_dict()
    for key, shape in SPEC_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(1 for k in sd if k.startswith("blocks.") and k.endswith("cross_attn.k_proj.weight")) == 28
    assert not any(k.startswith("llm_adapter.in_proj") or "pos_embedder" in k for k in sd)
    total = sum(v.numel() for v in sd.values())
    assert 2.08e9 < total < 2.10e9                      # "≈ 2.09 B" (DiT 1.956 B + adapter 134.7 M)
    assert config_from_state_dict(sd) == AnimaConfig()


def test_full_qwen3_on_meta_matches_qwen3_06b():
    with torch.device("meta"):
        sd = Qwen3Encoder(Qwen3Config()).state_dict()
    assert tuple(sd["model.embed_tokens.weight"].shape) == (151936, 1024)
    assert tuple(sd["model.layers.27.self_attn.k_proj.weight"].shape) == (1024, 1024)    # 8 KV heads × 128
    assert tuple(sd["model.layers.0.self_attn.q_proj.weight"].shape) == (2048, 1024)     # 16 heads × 128
    assert tuple(sd["model.layers.0.self_attn.q_norm.weight"].shape) == (128,)
    assert 5.9e8 < sum(v.numel() for v in sd.values()) < 6.0e8


def test_tiny_checkpoint_round_trip_with_net_prefix(tmp_path):
    model = tiny_dit(seed=3)
    path = tmp_path / "anima_tiny.safetensors"
    save_file({f"net.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = AnimaDiT.from_state_dict(load_state_dict(str(path)))
    assert loaded.config == model.config
    x, ctx = torch.randn(1, 16, 1, 4, 6), torch.randn(1, 7, model.config.crossattn_emb_channels)
    t = torch.tensor([0.4])
    assert torch.allclose(loaded(x, t, ctx), model(x, t, ctx), atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_bf16_storage_computes_in_the_input_dtype():
    model = tiny_dit(seed=1)
    half = AnimaDiT.from_state_dict(model.state_dict(), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    x, ctx = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 5, model.config.crossattn_emb_channels)
    out = half(x, torch.tensor([0.5]), ctx)                 # fp32 input: weights are cast at use
    assert out.dtype == torch.float32
    assert torch.allclose(out, model(x, torch.tensor([0.5]), ctx), atol=0.1)


def test_not_an_anima_file_is_refused_with_what_is_missing():
    with pytest.raises(CheckpointError, match="not an Anima / Cosmos-Predict2 diffusion model"):
        AnimaDiT.from_state_dict({"model.embed_tokens.weight": torch.zeros(4, 4)})
    sd = tiny_dit().state_dict()
    sd["blocks.0.cross_attn.k_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="Wrong shape"):
        AnimaDiT.from_state_dict(sd)


def test_odd_latent_sizes_are_padded_and_cropped_back():
    model = tiny_dit()
    x = torch.randn(2, 16, 1, 5, 7)
    out = model(x, torch.tensor([0.2, 0.9]), torch.randn(2, 3, model.config.crossattn_emb_channels))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_t5_ids_run_the_adapter_and_pad_the_context_to_512():
    model = tiny_dit(seed=2)
    qwen_states = torch.randn(1, 9, model.config.adapter.source_dim)
    ids = torch.randint(0, model.config.adapter.vocab_size, (1, 11))
    weights = torch.rand(1, 11, 1) + 0.5
    ctx = model.preprocess_text_embeds(qwen_states, ids, t5xxl_weights=weights)
    assert ctx.shape == (1, 512, model.config.crossattn_emb_channels)
    assert torch.count_nonzero(ctx[:, 11:]) == 0          # zero rows: the attention sinks Anima expects
    x, t = torch.randn(1, 16, 1, 4, 4), torch.tensor([0.7])
    direct = model(x, t, qwen_states, t5xxl_ids=ids, t5xxl_weights=weights)
    assert torch.allclose(direct, model(x, t, ctx), atol=1e-6)


def test_qwen3_encoder_is_causal_and_loads_from_its_keys():
    enc = randomize(Qwen3Encoder(TINY_QWEN), 5, std=0.2)
    ids = torch.randint(0, TINY_QWEN.vocab_size, (1, 6))
    full = enc(ids)
    assert torch.allclose(enc(ids[:, :4]), full[:, :4], atol=1e-5)     # later tokens never change earlier states
    again = Qwen3Encoder.from_state_dict({**enc.state_dict(), "lm_head.weight": torch.zeros(1)})
    assert torch.allclose(again(ids), full, atol=1e-5)


def test_tiny_config_is_really_tiny():
    assert sum(p.numel() for p in AnimaDiT(tiny_config()).parameters()) < 200_000
