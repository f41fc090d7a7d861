"""Loading Wan 2.1 DiT checkpoints: official and ComfyUI-prefixed files, clear errors naming the
tensor, dtype plans (bf16, fp8 storage, scaled fp8 files), and .pth files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from slipstream.kernels.cast_linear import CastLinear
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan.config import tiny
from slipstream.models.wan.dit import WanDiT, random_state_dict

FP8 = torch.float8_e4m3fn


def small(model_type="t2v", **kw):
    return tiny(model_type, text_dim=64, clip_dim=96, **kw)


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    extra = {}
    if cfg.model_type != "t2v":
        extra = {"clip_fea": torch.randn(1, 257, cfg.clip_dim, generator=g),
                 "y": torch.randn(1, 20, 2, 4, 4, generator=g)}
    return x, torch.tensor([500.0]), torch.randn(1, 9, cfg.text_dim, generator=g), extra


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_official_and_comfyui_prefixed_files_load_into_the_same_model(tmp_path, model_type):
    cfg = small(model_type)
    sd = random_state_dict(cfg, seed=4)
    official, comfy = tmp_path / "official.safetensors", tmp_path / "comfy.safetensors"
    save_file(sd, str(official))
    # A ComfyUI all-in-one layout: the DiT under model.diffusion_model., other models beside it.
    save_file({**{"model.diffusion_model." + k: v for k, v in sd.items()},
               "vae.decoder.conv1.weight": torch.zeros(2, 2)}, str(comfy))
    a, b = WanDiT.from_file(str(official)), WanDiT.from_file(str(comfy))
    assert a.config == b.config and a.config.model_type == model_type
    for key, value in sd.items():
        assert torch.equal(a.state_dict()[key], value) and torch.equal(b.state_dict()[key], value), key
    x, t, ctx, extra = inputs(cfg)
    torch.testing.assert_close(a(x, t, ctx, **extra), b(x, t, ctx, **extra), rtol=0, atol=0)
    from_memory = WanDiT.from_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()})
    torch.testing.assert_close(from_memory(x, t, ctx, **extra), a(x, t, ctx, **extra), rtol=0, atol=0)


def test_loaded_model_owns_no_meta_tensors_and_needs_no_grad(tmp_path):
    sd = random_state_dict(small())
    model = WanDiT.from_state_dict(sd)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    assert not model.training
    # same dtype and device: the model adopts the caller's tensors instead of copying them
    assert model.blocks[0].ffn[0].weight.data_ptr() == sd["blocks.0.ffn.0.weight"].data_ptr()


def test_wrong_shape_names_the_tensor(tmp_path):
    sd = random_state_dict(small())
    sd["blocks.1.cross_attn.k.weight"] = torch.zeros(256, 128)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.cross_attn\.k\.weight \(256, 128\) \(expected \(256, 256\)\)"):
        WanDiT.from_file(str(path))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    sd = random_state_dict(small())
    del sd["blocks.0.self_attn.norm_k.weight"]
    sd["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        WanDiT.from_file(str(path))
    assert "Missing tensor(s): blocks.0.self_attn.norm_k.weight" in str(err.value)
    assert "Unexpected tensor(s): blocks.0.self_attn.extra.weight" in str(err.value)
    with pytest.raises(CheckpointError, match="norm_k.weight"):
        WanDiT.from_state_dict(sd)


def test_truncated_and_foreign_files_fail_clearly(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(random_state_dict(small()), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        WanDiT.from_file(str(path))
    vae = tmp_path / "vae.safetensors"
    save_file({"decoder.conv1.weight": torch.zeros(2), "encoder.conv1.weight": torch.zeros(2)}, str(vae))
    with pytest.raises(CheckpointError, match="VAE"):
        WanDiT.from_file(str(vae))


def test_dtype_plan_bf16_and_fp8_storage(tmp_path):
    cfg = small()
    sd = random_state_dict(cfg)
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    bf = WanDiT.from_file(str(path), dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    f8 = WanDiT.from_file(str(path), dtype=torch.bfloat16, weight_dtype=FP8)
    quant = set(f8.quantizable_keys())
    assert len(quant) == cfg.num_layers * 10                          # q,k,v,o x2 + ffn.0/2 per block
    for key, value in f8.state_dict().items():
        if key.endswith(".weight_scale"):           # per-tensor scale = absmax / 448, kept in fp32
            weight = sd[key.replace("weight_scale", "weight")]
            assert value.dtype == torch.float32 and value.item() == pytest.approx(weight.abs().max() / 448)
        else:
            assert value.dtype == (FP8 if key in quant else torch.bfloat16), key
    assert "text_embedding.0.weight" not in quant and "head.head.weight" not in quant
    ref = WanDiT.from_file(str(path))
    x, t, ctx, _ = inputs(cfg)
    out8, ref_out = f8(x, t, ctx), ref(x, t, ctx)
    assert torch.isfinite(out8).all()
    assert (out8 - ref_out).norm() / ref_out.norm() < 0.08
    with pytest.raises(CheckpointError, match="weight_dtype"):
        WanDiT.from_file(str(path), dtype=FP8)


def test_fp8_file_stays_fp8_by_default_and_computes_in_bf16(tmp_path):
    cfg = small()
    sd = random_state_dict(cfg)
    model = WanDiT.from_state_dict(sd, weight_dtype=FP8)
    path = tmp_path / "fp8.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = WanDiT.from_file(str(path))
    assert again.compute_dtype == torch.bfloat16
    assert again.blocks[0].self_attn.q.weight.dtype == FP8
    assert torch.equal(again.blocks[0].self_attn.q.weight.float(), model.blocks[0].self_attn.q.weight.float())
    upcast = WanDiT.from_file(str(path), dtype=torch.float32, weight_dtype=torch.float32)
    assert upcast.blocks[0].ffn[2].weight.dtype == torch.float32


def test_scaled_fp8_file_keeps_scales_or_dequantizes(tmp_path):
    cfg = small()
    sd = random_state_dict(cfg)
    scaled = {"scaled_fp8": torch.zeros(0, dtype=FP8)}
    for key, value in sd.items():
        layer = key.removesuffix(".weight")
        if key.startswith("blocks.") and key.endswith(".weight") and value.dim() == 2:
            # block 0 with one scale per output row ([N]), block 1 with one per tensor
            scale = value.abs().amax(1) / 448.0 if key.startswith("blocks.0.") else value.abs().max() / 448.0
            scaled[f"model.diffusion_model.{key}"] = (value / scale.reshape(-1, 1)).to(FP8)
            scaled[f"model.diffusion_model.{layer}.scale_weight"] = scale.reshape(-1)
            scaled[f"model.diffusion_model.{layer}.scale_input"] = torch.ones(1)
        else:
            scaled[f"model.diffusion_model.{key}"] = value
    path = tmp_path / "scaled.safetensors"
    save_file(scaled, str(path))
    kept = WanDiT.from_file(str(path), dtype=torch.float32)
    q = kept.blocks[1].cross_attn.q
    assert isinstance(q, CastLinear) and q.weight.dtype == FP8 and q.weight_scale is not None
    deq = WanDiT.from_file(str(path), dtype=torch.float32, weight_dtype=torch.float32)
    assert deq.blocks[1].cross_attn.q.weight_scale is None
    torch.testing.assert_close(deq.blocks[1].cross_attn.q.weight, q.dequantize(torch.float32))
    err = (q.dequantize() - sd["blocks.1.cross_attn.q.weight"]).abs().max()
    assert err < 0.08 * sd["blocks.1.cross_attn.q.weight"].abs().max()
    row = kept.blocks[0].ffn[0]
    assert row.weight_scale.shape == (512, 1)
    torch.testing.assert_close(deq.blocks[0].ffn[0].weight, row.dequantize(torch.float32))
    err = (row.dequantize() - sd["blocks.0.ffn.0.weight"]).abs().amax(1)
    assert (err <= 0.07 * sd["blocks.0.ffn.0.weight"].abs().amax(1)).all()      # per-row accuracy
    x, t, ctx, _ = inputs(cfg)
    torch.testing.assert_close(kept(x, t, ctx), deq(x, t, ctx), atol=1e-4, rtol=1e-4)


def test_pth_files_load_too(tmp_path):
    cfg = small("i2v")
    sd = random_state_dict(cfg)
    path = tmp_path / "m.pth"
    torch.save(sd, path)
    model = WanDiT.from_file(str(path))
    assert model.config.model_type == "i2v"
    assert torch.equal(model.state_dict()["img_emb.proj.3.weight"], sd["img_emb.proj.3.weight"])


def test_fp8_quantization_leaves_the_callers_tensors_alone():
    sd = random_state_dict(small())
    copy = {k: v.clone() for k, v in sd.items()}
    model = WanDiT.from_state_dict(sd, weight_dtype=FP8, dtype=torch.float32)
    assert model.blocks[0].ffn[0].weight.dtype == FP8
    for key, value in copy.items():
        assert torch.equal(sd[key], value), key
