"""GGUF DiTs through the Wan nodes: listed beside safetensors, sampled with and without block swap,
LoRAs merged into their packed layers, and the quantization choice that does not apply refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from slipstream import NODE_CLASS_MAPPINGS as N
from slipstream.kernels.gguf_linear import GGUFLinear
from slipstream.kernels.precision import UnsupportedDtypeError
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan import demo_assets as assets
from slipstream.models.wan.t5 import UMT5Encoder

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from gguf_fixtures import write_umt5, write_wan_dit  # noqa: E402

# wan_dirs points the host at this module's tiny_models (pytest resolves the fixture it asks for here)
from test_wan_nodes import _node, _text_embeds, _write_lora, wan_dirs  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("single_thread", "wan_dirs")
GGUF_T2V = "wan_tiny_t2v-Q8_0.gguf"
GGUF_UMT5 = "umt5_tiny-Q8_0.gguf"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_gguf")
    assets.write_tiny_wan_models(root / "models", root / "input", image_to_video=False)
    folder = root / "models" / "diffusion_models"
    write_wan_dit(folder / GGUF_T2V, load_file(str(folder / assets.DIT_T2V)), "Q8_0")
    text = root / "models" / "text_encoders"
    (text / "gguf").mkdir()
    official = UMT5Encoder.from_file(str(text / assets.TEXT_ENCODER), dtype=torch.float32).state_dict()
    write_umt5(text / "gguf" / GGUF_UMT5, official, "Q8_0")
    (text / "gguf" / "spiece.model").write_bytes(assets.tiny_spiece_model())
    write_umt5(text / "no_tokenizer.gguf", official, "Q8_0")
    return root


def _sample(model, embeds):
    (empty,) = _node("SlipstreamWanEmptyEmbeds")(64, 48, 9)
    latent, _denoised = _node("SlipstreamWanSampler")(model, empty, embeds, 2, 5.0, 5.0, 3, "unipc", 1.0, True, "auto")
    return latent["samples"]


def _load(name, quantization="disabled", **kw):
    (model,) = _node("SlipstreamWanModelLoader")(name, "fp32", quantization, "main_device", **kw)
    return model


def test_gguf_files_are_listed_with_the_others():
    choices = N["SlipstreamWanModelLoader"].INPUT_TYPES()["required"]["model"][0]
    assert GGUF_T2V in choices and assets.DIT_T2V in choices


def test_gguf_samples_like_the_float_file_with_and_without_block_swap():
    embeds = _text_embeds()
    model = _load(GGUF_T2V)
    assert isinstance(model.dit.blocks[0].self_attn.q, GGUFLinear)
    plain = _sample(model, embeds)
    (swap,) = _node("SlipstreamWanBlockSwap")(1, False, True, True, 1)
    swapped_model = _load(GGUF_T2V, block_swap_args=swap)
    assert swapped_model.host_blocks is not None
    assert torch.equal(_sample(swapped_model, embeds), plain)
    reference = _sample(_load(assets.DIT_T2V), embeds)
    rel = float((plain - reference).norm() / reference.norm())
    assert 0 < rel < 0.05, f"Q8_0 strays {rel:.4f} from the float file"


def test_lora_merges_into_packed_layers(tiny_models):
    _write_lora(tiny_models / "models" / "loras" / "tiny_lora.safetensors")
    (chain,) = _node("SlipstreamWanLoraSelect")("tiny_lora.safetensors", 0.5)
    plain, patched = _load(GGUF_T2V), _load(GGUF_T2V, lora=chain)
    float_plain, float_patched = _load(assets.DIT_T2V), _load(assets.DIT_T2V, lora=chain)
    layer = patched.dit.blocks[0].self_attn.q
    assert isinstance(layer, GGUFLinear) and layer.qtype.name == "Q8_0"
    delta = layer.dequantize() - plain.dit.blocks[0].self_attn.q.dequantize()
    expected = float_patched.dit.blocks[0].self_attn.q.weight - float_plain.dit.blocks[0].self_attn.q.weight
    assert float((delta - expected).norm() / expected.norm()) < 0.02
    untouched = patched.dit.blocks[1].self_attn.q
    assert torch.equal(untouched.weight, plain.dit.blocks[1].self_attn.q.weight)


def test_quantizing_a_gguf_again_is_refused():
    with pytest.raises(UnsupportedDtypeError, match="GGUF file, already quantized.*'disabled'"):
        _load(GGUF_T2V, "fp8_e4m3fn")


def _encode(name, prompt="a red fox runs through fresh snow"):
    (encoder,) = _node("SlipstreamWanTextEncoderLoader")(name, "fp32", "offload_device")
    (embeds,) = _node("SlipstreamWanTextEncode")(encoder, prompt, "blurry", "gpu", True)
    return encoder, embeds


def test_gguf_text_encoder_is_listed_and_encodes_like_the_float_file():
    choices = N["SlipstreamWanTextEncoderLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert f"gguf/{GGUF_UMT5}" in choices and assets.TEXT_ENCODER in choices
    handle, embeds = _encode(f"gguf/{GGUF_UMT5}")
    assert isinstance(handle.encoder.blocks[0].attn.q, GGUFLinear)
    _, reference = _encode(assets.TEXT_ENCODER)
    assert [t.shape for t in embeds.positive] == [t.shape for t in reference.positive]
    rel = float((embeds.positive[0] - reference.positive[0]).norm() / reference.positive[0].norm())
    assert 0 < rel < 0.05, f"Q8_0 umT5 strays {rel:.4f} from the float file"


def test_gguf_text_encoder_without_a_tokenizer_says_what_to_add():
    with pytest.raises(CheckpointError, match="spiece.model"):
        _encode("no_tokenizer.gguf")
