"""INT8-Fast workflows on our OTUNetLoaderW8A8: its float weight_dtype values and its ConvRot toggle,
in the widget order its saved workflows store them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from slipstream.kernels.int8 import Int8Linear
from slipstream.models.wan.config import tiny
from slipstream.models.wan.dit import random_state_dict
from slipstream.nodes.quant import LoadDiffusionModelInt8

CONFIG = tiny("t2v", text_dim=64, num_layers=1)


@pytest.fixture
def wan_file(workdirs):
    folder = workdirs["models"] / "diffusion_models"
    folder.mkdir(exist_ok=True)
    sd = random_state_dict(CONFIG, seed=2)
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(folder / "tiny_wan.safetensors"))
    return "tiny_wan.safetensors"


def test_widgets_in_the_order_int8_fast_workflows_store_them():
    inputs = LoadDiffusionModelInt8.INPUT_TYPES()
    order = [*inputs["required"], *inputs["optional"]]
    assert order[:5] == ["unet_name", "weight_dtype", "model_type", "on_the_fly_quantization", "enable_convrot"]
    assert {"fp16", "bf16", "default", "fp8_e4m3fn"} <= set(inputs["required"]["weight_dtype"][0])
    toggle = inputs["optional"]["enable_convrot"]
    assert toggle[0] == "BOOLEAN" and toggle[1]["default"] is True and toggle[1]["tooltip"]


@pytest.mark.parametrize("weight_dtype, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_float_weight_dtypes_set_the_precision_of_the_float_layers(wan_file, weight_dtype, dtype):
    (model,) = LoadDiffusionModelInt8().load_unet(wan_file, weight_dtype, "wan", True)
    dit = model.model.diffusion_model
    assert isinstance(dit.blocks[0].self_attn.q, Int8Linear)
    assert dit.blocks[0].self_attn.q.weight.dtype == torch.int8
    assert dit.head.head.weight.dtype == dtype
    assert dit.text_embedding[0].weight.dtype == dtype


def test_convrot_toggle_turns_rotation_off_for_on_the_fly_layers(wan_file):
    loader = LoadDiffusionModelInt8()
    (rotated,) = loader.load_unet(wan_file, "default", "wan", True)
    (plain,) = loader.load_unet(wan_file, "default", "wan", True, enable_convrot=False)
    assert rotated.model.diffusion_model.blocks[0].ffn[0].rotation_group == 256
    assert plain.model.diffusion_model.blocks[0].ffn[0].rotation_group == 0
