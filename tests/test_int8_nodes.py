"""The two INT8 nodes in the standalone host, on a tiny Wan 2.1 DiT written to real safetensors files."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from slipstream.host.paths import ModelNotFoundError
from slipstream.kernels.cast_linear import Fp8Linear
from slipstream.kernels.fp8 import quantize_scaled_fp8
from slipstream.kernels.int8 import Int8Linear, decode_comfy_quant
from slipstream.kernels.precision import UnsupportedDtypeError
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.quant_presets import ModelTypeError
from slipstream.models.wan.config import tiny
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.nodes.quant import LoadDiffusionModelInt8, SaveInt8Model

CONFIG = tiny("t2v", text_dim=64)


@pytest.fixture(scope="module")
def float_sd():
    return random_state_dict(CONFIG, seed=1)


@pytest.fixture
def unet_dir(workdirs):
    folder = workdirs["models"] / "diffusion_models"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def wan_file(unet_dir, float_sd):
    save_file({f"model.diffusion_model.{k}": v for k, v in float_sd.items()}, str(unet_dir / "tiny_wan.safetensors"))
    return "tiny_wan.safetensors"


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 1, 4, 4, generator=gen), torch.tensor([500.0]),
            torch.randn(1, 8, CONFIG.text_dim, generator=gen))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _load(name, weight_dtype="default", model_type="auto", otf=True):
    (model,) = LoadDiffusionModelInt8().load_unet(name, weight_dtype, model_type, otf)
    return model


def test_on_the_fly_load_quantizes_blocks_and_keeps_the_preset_float(wan_file, float_sd):
    model = _load(wan_file)
    dit = model.model.diffusion_model
    assert isinstance(dit.blocks[0].self_attn.q, Int8Linear) and dit.blocks[1].ffn[2].rotation_group == 256
    for name in ("head.head", "time_projection.1", "text_embedding.0"):
        assert not isinstance(dit.get_submodule(name), Int8Linear), name
    report = model.model.quant_report
    assert report.kinds()["int8"] == 2 * 10 and set(report.excluded().values()) == {
        "head", "time_projection", "text_embedding", "time_embedding"}
    reference = WanDiT.from_state_dict(float_sd, dtype=torch.float32)
    with torch.no_grad():
        y, ref = dit(*_inputs()), reference(*_inputs())
    assert y.dtype == torch.float32 and _rel(y, ref) < 0.03


def test_save_writes_the_official_layout_and_reloads_bit_for_bit(wan_file, workdirs):
    model = _load(wan_file)
    out = SaveInt8Model().save(model, "diffusion_models/tiny_int8")
    assert "int8 layers" in out["ui"]["text"][0]
    saved = workdirs["output"] / "diffusion_models" / "tiny_int8_00001_.safetensors"
    with safe_open(str(saved), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("blocks.0.ffn.0.weight").dtype == torch.int8
        assert f.get_tensor("blocks.0.ffn.0.weight_scale").shape == (CONFIG.ffn_dim, 1)
        assert decode_comfy_quant(f.get_tensor("blocks.0.ffn.0.comfy_quant")) == {
            "format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
        assert f.get_tensor("head.head.weight").dtype == torch.float32 and "head.head.comfy_quant" not in keys
        assert f.metadata()["slipstream_model_type"] == "wan"
    SaveInt8Model().save(model, "diffusion_models/tiny_int8")
    assert (saved.parent / "tiny_int8_00002_.safetensors").exists()           # never overwrites
    shutil.copy(saved, workdirs["models"] / "diffusion_models" / "tiny_int8.safetensors")
    again = _load("tiny_int8.safetensors", otf=False)
    a, b = model.model.diffusion_model, again.model.diffusion_model
    for name, module in a.named_modules():
        if isinstance(module, Int8Linear):
            other = b.get_submodule(name)
            assert torch.equal(other.weight, module.weight) and torch.equal(other.weight_scale, module.weight_scale)
            assert other.rotation_group == module.rotation_group
    with torch.no_grad():
        assert torch.equal(a(*_inputs()), b(*_inputs()))
    assert again.model.quant_report.summary().startswith("20 int8 Linear layers (20 pre-quantized, 0 quantized")


def test_scaled_fp8_file_is_dequantized_with_its_scale(unet_dir, float_sd):
    sd = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for key, value in float_sd.items():
        if key.startswith("blocks.") and key.endswith(".weight") and value.dim() == 2:
            w8, scale = quantize_scaled_fp8(value * 50.0, torch.float8_e4m3fn)   # scales far from 1
            sd[key] = w8
            sd[key[: -len(".weight")] + ".scale_weight"] = (scale / 50.0).reshape(1)
        else:
            sd[key] = value
    save_file(sd, str(unet_dir / "fp8.safetensors"))
    model = _load("fp8.safetensors")
    reference = WanDiT.from_state_dict(float_sd, dtype=torch.float32)
    with torch.no_grad():
        assert _rel(model.model.diffusion_model(*_inputs()), reference(*_inputs())) < 0.06
    assert "from scaled fp8" in model.model.quant_report.entries["blocks.0.self_attn.q"][1]


def test_fp8_storage_for_float_layers_and_fast_mode_says_when_unavailable(wan_file, caplog):
    with caplog.at_level(logging.INFO, logger="slipstream.int8"):
        model = _load(wan_file, weight_dtype="fp8_e4m3fn_fast")
    head = model.model.diffusion_model.head.head
    assert isinstance(head, Fp8Linear) and head.weight.dtype == torch.float8_e4m3fn
    assert "fp8 matmul needs an NVIDIA GPU with compute capability 8.9" in caplog.text
    assert "detected Wan 2.1/2.2" in caplog.text


def test_float_file_without_on_the_fly_loads_float_and_says_so(wan_file, caplog):
    with caplog.at_level(logging.WARNING, logger="slipstream.int8"):
        model = _load(wan_file, otf=False)
    assert "no int8 layers and on_the_fly_quantization is off" in caplog.text
    assert not any(isinstance(m, Int8Linear) for m in model.model.modules())


def test_errors_say_what_to_do(wan_file, workdirs):
    with pytest.raises(ModelNotFoundError, match="Close matches: tiny_wan.safetensors"):
        _load("tiny_wan.safetensor")
    with pytest.raises(UnsupportedDtypeError, match="Valid choices: default, fp8_e4m3fn, fp8_e4m3fn_fast, fp8_e5m2"):
        _load(wan_file, weight_dtype="int4")
    with pytest.raises(ModelTypeError, match="Choose 'wan' or 'auto'"):
        _load(wan_file, model_type="flux2")
    folder = workdirs["models"] / "diffusion_models"
    data = (folder / wan_file).read_bytes()
    (folder / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        _load("cut.safetensors")
    save_file({"double_stream_modulation_img.lin.weight": torch.zeros(8, 8),
               "double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8)}, str(folder / "flux2.safetensors"))
    with pytest.raises(ValueError, match="This is a Flux.2 model. Outside ComfyUI"):
        _load("flux2.safetensors")
    bad = random_state_dict(CONFIG, seed=2)
    bad["blocks.1.ffn.0.weight"][0, 0] = float("nan")
    save_file(bad, str(folder / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"'blocks\.1\.ffn\.0(\.weight)?'.*NaN"):
        _load("nan.safetensors")
    assert not os.path.exists(workdirs["output"] / "diffusion_models")


def test_save_refuses_a_model_without_int8_layers(wan_file):
    with pytest.raises(ValueError, match="no int8 layers"):
        SaveInt8Model().save(_load(wan_file, otf=False), "x")


def test_standalone_builds_anima_too(unet_dir):
    from slipstream.models.anima.dit import AnimaDiT, tiny_config

    torch.manual_seed(0)
    reference = AnimaDiT(tiny_config(model_channels=128, num_heads=2)).eval()
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_file({f"net.{k}": v.contiguous() for k, v in reference.state_dict().items()},
              str(unet_dir / "tiny_anima.safetensors"))
    model = _load("tiny_anima.safetensors")
    dit = model.model.diffusion_model
    assert model.model.model_family == "anima"
    assert isinstance(dit.blocks[0].self_attn.q_proj, Int8Linear) and isinstance(dit.blocks[1].mlp.layer2, Int8Linear)
    for name in ("x_embedder.proj.1", "final_layer.linear", "blocks.0.adaln_modulation_mlp.1",
                 "llm_adapter.blocks.0.cross_attn.q_proj"):
        assert not isinstance(dit.get_submodule(name), Int8Linear), name
    gen = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 16, 1, 8, 8, generator=gen), torch.tensor([0.5]), torch.randn(1, 6, 32, generator=gen)
    with torch.no_grad():
        assert _rel(dit(x, t, ctx), reference(x, t, ctx)) < 0.05


def test_loader_note_names_the_cpu_int8_kernel_and_layers_hold_it(wan_file, caplog):
    from slipstream.kernels import int8_onednn
    from slipstream.kernels.int8 import int8_report

    with caplog.at_level(logging.INFO, logger="slipstream.int8"):
        model = _load(wan_file)
    assert f"int8 CPU kernel: {int8_onednn.describe()}" in caplog.text
    assert "ConvRot on 20 layers" in caplog.text
    report = int8_report(model.model.diffusion_model)
    expected = report["int8_layers"] if int8_onednn.backend() == int8_onednn.BACKEND_PREPACKED else 0
    assert report["int8_layers"] == 20 and report["packed_layers"] == expected


def test_save_writes_float_layers_in_the_file_dtype_even_if_the_host_widened_them(unet_dir, workdirs):
    """ComfyUI keeps some layers wider than the file (Wan's patch embedding in fp32): the saved file
    carries every float tensor in the dtype it had in the source, with its value."""
    sd = random_state_dict(CONFIG, seed=2, dtype=torch.bfloat16)
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(unet_dir / "tiny_bf16.safetensors"))
    model = _load("tiny_bf16.safetensors")
    dit = model.model.diffusion_model
    dit.patch_embedding.float()                             # what a host may do to a layer it keeps wide
    SaveInt8Model().save(model, "diffusion_models/bf16_kept")
    saved = workdirs["output"] / "diffusion_models" / "bf16_kept_00001_.safetensors"
    with safe_open(str(saved), "pt") as f:
        for key, value in sd.items():
            got = f.get_tensor(key)
            if got.dtype == torch.int8:
                continue
            assert got.dtype == value.dtype and torch.equal(got, value), key
        widened = [k for k in f.keys() if f.get_tensor(k).dtype == torch.float32 and not k.endswith("weight_scale")]
    assert widened == []
