"""CLIP ViT-H/14 vision tower for Wan I2V: key layouts at full size (meta), three file layouts, features."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan import clip_vision as C
from slipstream.models.wan.demo_assets import seeded_state_dict
from slipstream.models.wan.weights import build_on_meta

pytestmark = pytest.mark.usefixtures("single_thread")


def _random_tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return seeded_state_dict(lambda: C.WanClipVision(C.TINY_VIT), seed, lambda name, shape, noise: (
        1.0 + 0.1 * noise if ("norm" in name and name.endswith("weight")) else 0.2 * noise))


@pytest.fixture(scope="module")
def tiny_sd():
    return _random_tiny_state_dict()


@pytest.fixture(scope="module")
def tower(tiny_sd):
    return C.WanClipVision.from_state_dict(dict(tiny_sd))


def _to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's clip_vision_h layout of the same weights (written independently of the loader)."""
    out = {"vision_model.embeddings.position_ids": torch.arange(sd["pos_embedding"].shape[1])[None]}
    for key, t in sd.items():
        parts = key.split(".")
        if key == "patch_embedding.weight":
            out["vision_model.embeddings.patch_embedding.weight"] = t
        elif key == "cls_embedding":
            out["vision_model.embeddings.class_embedding"] = t.reshape(-1)
        elif key == "pos_embedding":
            out["vision_model.embeddings.position_embedding.weight"] = t[0]
        elif parts[0] in ("pre_norm", "post_norm"):
            out[{"pre_norm": "vision_model.pre_layrnorm.", "post_norm": "vision_model.post_layernorm."}[parts[0]]
                + parts[1]] = t
        elif key == "head":
            out["visual_projection.weight"] = t.t().contiguous()
        else:
            layer = f"vision_model.encoder.layers.{parts[1]}."
            rest = ".".join(parts[2:])
            if rest.startswith("attn.to_qkv."):
                for name, chunk in zip("qkv", t.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{name}_proj.{parts[-1]}"] = chunk.contiguous()
            else:
                out[layer + {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                             "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}[rest.rsplit(".", 1)[0]] + "." + parts[-1]] = t
    return out


def _to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in sd.items():
        parts = key.split(".")
        simple = {"patch_embedding.weight": ("visual.conv1.weight", t), "cls_embedding": ("visual.class_embedding", t.reshape(-1)),
                  "pos_embedding": ("visual.positional_embedding", t[0]), "head": ("visual.proj", t)}
        if key in simple:
            name, value = simple[key]
            out[name] = value
        elif parts[0] in ("pre_norm", "post_norm"):
            out[f"visual.ln_{parts[0][:-5]}.{parts[1]}"] = t
        else:
            rest = ".".join(parts[2:-1])
            name = {"norm1": "ln_1", "norm2": "ln_2", "attn.proj": "attn.out_proj", "mlp.0": "mlp.c_fc",
                    "mlp.2": "mlp.c_proj"}.get(rest)
            block = f"visual.transformer.resblocks.{parts[1]}."
            out[block + (f"attn.in_proj_{parts[-1]}" if rest == "attn.to_qkv" else f"{name}.{parts[-1]}")] = t
    out["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3, 3)  # the text tower (ignored)
    return out


def _images(n: int = 2, h: int = 40, w: int = 70, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 3, h, w), generator=torch.Generator().manual_seed(seed))


# ---- full-size architecture ---------------------------------------------------------------------

def test_full_vit_h_on_meta_has_the_official_visual_keys_and_shapes():
    sd = {"visual." + k: v for k, v in build_on_meta(lambda: C.WanClipVision()).state_dict().items()}
    assert len(sd) == 392
    assert sum(t.numel() for t in sd.values()) == 632_076_800
    expect = {"visual.cls_embedding": (1, 1, 1280), "visual.pos_embedding": (1, 257, 1280),
              "visual.patch_embedding.weight": (1280, 3, 14, 14), "visual.pre_norm.weight": (1280,),
              "visual.pre_norm.bias": (1280,), "visual.post_norm.weight": (1280,), "visual.head": (1280, 1024)}
    for i in range(32):
        b = f"visual.transformer.{i}."
        expect.update({b + "norm1.weight": (1280,), b + "norm1.bias": (1280,), b + "attn.to_qkv.weight": (3840, 1280),
                       b + "attn.to_qkv.bias": (3840,), b + "attn.proj.weight": (1280, 1280), b + "attn.proj.bias": (1280,),
                       b + "norm2.weight": (1280,), b + "mlp.0.weight": (5120, 1280), b + "mlp.0.bias": (5120,),
                       b + "mlp.2.weight": (1280, 5120), b + "mlp.2.bias": (1280,)})
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    assert "visual.patch_embedding.bias" not in sd
    assert C.VIT_H_14.tokens == 257 and C.VIT_H_14.feature_layers == 31


def test_full_hf_layout_maps_onto_the_model():
    meta = build_on_meta(lambda: C.WanClipVision()).state_dict()
    hf = _to_hf(meta)
    assert "vision_model.encoder.layers.30.layer_norm1.weight" in hf  # ComfyUI's ViT-H detection key
    tower = C.WanClipVision.from_state_dict(hf)  # meta tensors in, meta model out: no memory used
    assert tower.config == C.VIT_H_14
    assert {k: tuple(v.shape) for k, v in tower.state_dict().items()} == {k: tuple(v.shape) for k, v in meta.items()}


# ---- features ----------------------------------------------------------------------------------

def test_features_shape_determinism_and_dtypes(tiny_sd, tower):
    px = tower.preprocess(_images())
    out = tower(px)
    assert out.shape == (2, C.TINY_VIT.tokens, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.equal(tower(px), out)
    bf16 = C.WanClipVision.from_state_dict(dict(tiny_sd), dtype=torch.bfloat16)
    out16 = bf16(px)
    assert bf16.dtype == torch.bfloat16 and out16.dtype == torch.float32 and torch.isfinite(out16).all()
    assert (out16 - out).abs().mean() < 0.05 * out.abs().mean()


def test_features_come_from_the_penultimate_block(tiny_sd, tower):
    px = tower.preprocess(_images())
    x = tower.patch_embedding(px).flatten(2).transpose(1, 2)
    x = torch.cat([tower.cls_embedding.expand(2, -1, -1), x], 1) + tower.pos_embedding
    x = torch.nn.functional.layer_norm(x, (64,), tower.pre_norm.weight, tower.pre_norm.bias, 1e-5)
    for block in list(tower.transformer)[:2]:
        h = torch.nn.functional.layer_norm(x, (64,), block.norm1.weight, block.norm1.bias, 1e-5)
        q, k, v = block.attn.to_qkv(h).view(2, -1, 3, 16, 4).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # 1/sqrt(head dim 4)
        x = x + block.attn.proj(att.transpose(1, 2).reshape(2, -1, 64))
        h = torch.nn.functional.layer_norm(x, (64,), block.norm2.weight, block.norm2.bias, 1e-5)
        x = x + block.mlp[2](torch.nn.functional.gelu(block.mlp[0](h)))
    assert torch.allclose(tower(px), x, atol=1e-4)
    changed = dict(tiny_sd)
    changed["transformer.2.mlp.0.weight"] = torch.zeros_like(tiny_sd["transformer.2.mlp.0.weight"])
    assert torch.equal(C.WanClipVision.from_state_dict(changed)(px), tower(px))


def test_preprocessing_squashes_or_center_crops(tower):
    mean = torch.tensor(C.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(C.CLIP_STD).view(1, 3, 1, 1)
    exact = _images(h=56, w=56)
    assert torch.allclose(tower.preprocess(exact), (exact - mean) / std, atol=1e-6)
    # A wide image: black left third, white middle, black right third.
    wide = torch.zeros(1, 3, 56, 168)
    wide[..., 56:112] = 1.0
    cropped = tower.preprocess(wide, crop=True) * std + mean
    assert cropped.shape == (1, 3, 56, 56) and torch.allclose(cropped, torch.ones_like(cropped), atol=1e-5)
    squashed = tower.preprocess(wide) * std + mean
    assert squashed[..., :, 5].max() < 0.05 and squashed[..., :, 28].min() > 0.95
    seen = []
    feats = tower.encode_image(wide, crop=True, callback=lambda d, t: seen.append((d, t)))
    assert feats.shape == (1, C.TINY_VIT.tokens, 64) and seen == [(1, 2), (2, 2)]
    with pytest.raises(ValueError, match="\\[B,3,56,56\\]"):
        tower(torch.zeros(1, 3, 32, 32))


# ---- loading -----------------------------------------------------------------------------------

def test_official_comfy_and_open_clip_files_load_the_same(tiny_sd, tower, tmp_path):
    px = tower.preprocess(_images())
    ref = tower(px)
    official = {**{"visual." + k: v for k, v in tiny_sd.items()}, "log_scale": torch.tensor(2.6),
                "textual.token_embedding.weight": torch.zeros(4, 8)}
    files = {"official.safetensors": official, "clip_vision_h.safetensors": _to_hf(tiny_sd),
             "prefixed.safetensors": {"clip_vision." + k: v for k, v in _to_hf(tiny_sd).items()},
             "open_clip.safetensors": _to_open_clip(tiny_sd)}
    for name, sd in files.items():
        save_file(sd, str(tmp_path / name))
        loaded = C.WanClipVision.from_file(str(tmp_path / name))
        assert torch.allclose(loaded(px), ref, atol=1e-5), name
    half = C.WanClipVision.from_file(str(tmp_path / "official.safetensors"), dtype=torch.float16)
    assert half.dtype == torch.float16


def test_scaled_fp8_hf_file_fuses_dequantized_qkv(tiny_sd, tower, tmp_path):
    hf = _to_hf(tiny_sd)
    quant = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in hf.items():
        if key.endswith(("_proj.weight", "fc1.weight", "fc2.weight")):
            scale = value.abs().max() / 448
            quant[key] = (value / scale).to(torch.float8_e4m3fn)
            quant[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            quant[key] = value
    save_file(quant, str(tmp_path / "clip_vision_h_fp8_scaled.safetensors"))
    loaded = C.WanClipVision.from_file(str(tmp_path / "clip_vision_h_fp8_scaled.safetensors"))
    block = loaded.transformer[0]
    assert block.mlp[0].weight.dtype == torch.float8_e4m3fn and block.mlp[0].weight_scale is not None
    assert block.attn.to_qkv.weight.dtype == torch.bfloat16  # q/k/v fused from their own scales
    px = tower.preprocess(_images())
    ref = tower(px)
    assert (loaded(px) - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_missing_or_wrong_tensor_is_named(tiny_sd):
    hf = _to_hf(tiny_sd)
    del hf["vision_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match="transformer.1.mlp.2.bias"):
        C.WanClipVision.from_state_dict(hf)
    wrong = dict(tiny_sd)
    wrong["transformer.0.attn.proj.weight"] = torch.zeros(64, 63)
    with pytest.raises(CheckpointError, match=r"transformer.0.attn.proj.weight \(64, 63\)"):
        C.WanClipVision.from_state_dict({"visual." + k: v for k, v in wrong.items()})
    with pytest.raises(CheckpointError, match="not a CLIP ViT-H/14"):
        C.WanClipVision.from_state_dict({"blocks.0.attn.q.weight": torch.zeros(2, 2)})


def test_loading_does_not_copy_official_weights(tiny_sd):
    sd = {"visual." + k: v for k, v in tiny_sd.items()}
    tower = C.WanClipVision.from_state_dict(sd)
    assert tower.transformer[1].mlp[0].weight.data_ptr() == tiny_sd["transformer.1.mlp.0.weight"].data_ptr()
