"""The speech model loader and the Wan Model Loader's speech_model input: family detection from key names,
clear errors for other files, and the added weights attached before quantization, LoRA and block swap
(so int8/fp8 storage covers them), with the sampler's audio inputs end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from slipstream import NODE_CLASS_MAPPINGS as N
from slipstream.models.wan import demo_assets as assets
from slipstream.models.wan import speech_models
from slipstream.models.wan.config import detect_config
from slipstream.models.wan.denoiser import SamplingExtras
from slipstream.models.wan.pipeline import SamplerSettings, WanImageEmbeds, WanTextEmbeds, sample_video_full
from slipstream.models.wan.speech_models import SpeechModelError, describe_speech_model
from wan_speech_fixtures import ToyConditioning, toy_families, toy_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")
SPEECH = "toy_multitalk.safetensors"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_speech")
    assets.write_tiny_wan_models(root / "models", root / "input")
    from safetensors import safe_open
    with safe_open(str(root / "models" / "diffusion_models" / assets.DIT_I2V), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    config = detect_config(shapes, {}, None, assets.DIT_I2V)
    save_file(toy_state_dict(config.num_layers, config.dim), str(root / "models" / "diffusion_models" / SPEECH))
    return root


@pytest.fixture
def wan_dirs(tiny_models, monkeypatch, host_folders):
    host_folders(tiny_models / "models", tiny_models / "input")
    monkeypatch.setattr(speech_models, "families", lambda: toy_families("multitalk"))
    return tiny_models


def _node(node_id):
    cls = N[node_id]
    return getattr(cls(), cls.FUNCTION)


def _load(quantization="disabled", model=assets.DIT_I2V, **kwargs):
    (speech,) = _node("SlipstreamWanSpeechModelLoader")(SPEECH)
    (handle,) = _node("SlipstreamWanModelLoader")(model, "fp32", quantization, "main_device", speech_model=speech,
                                                  **kwargs)
    return speech, handle


def test_the_loader_node_names_the_family_and_loads_nothing(wan_dirs, monkeypatch):
    assert SPEECH in N["SlipstreamWanSpeechModelLoader"].INPUT_TYPES()["required"]["model"][0]
    monkeypatch.setattr(speech_models, "load_state_dict", lambda *a, **k: pytest.fail("read the tensors"))
    (speech,) = _node("SlipstreamWanSpeechModelLoader")(SPEECH)
    assert (speech.family, speech.name) == ("multitalk", SPEECH) and speech.path.endswith(SPEECH)


@pytest.mark.parametrize("keys,looks", [
    ({"blocks.0.self_attn.q.weight": torch.zeros(2, 2), "patch_embedding.weight": torch.zeros(2)}, "Wan DiT without"),
    ({"blocks.0.ffn.0.lora_A.weight": torch.zeros(2, 2)}, "a LoRA"),
    ({"feature_extractor.conv_layers.0.conv.weight": torch.zeros(2)}, "wav2vec2 speech encoder"),
    ({"something.else": torch.zeros(2)}, "none of the known"),
])
def test_a_file_that_is_no_speech_model_says_what_it_looks_like(tmp_path, monkeypatch, keys, looks):
    monkeypatch.setattr(speech_models, "families", lambda: toy_families("multitalk"))
    path = tmp_path / "odd.safetensors"
    save_file(keys, str(path))
    with pytest.raises(SpeechModelError, match=f"odd.safetensors is not a MultiTalk.*{looks}"):
        describe_speech_model(str(path))


def test_speech_model_attaches_and_the_sampler_follows_the_audio(wan_dirs):
    _, handle = _load()
    assert handle.dit.audio_adapter is not None and handle.dit.blocks[0].toy_audio.weight.dtype == torch.float32
    (clip,) = _node("SlipstreamWanClipVisionLoader")(assets.CLIP_VISION, "fp32", "offload_device")
    image = _node("SlipstreamLoadReferenceImage")(assets.START_IMAGE)[0]
    (clip_embeds,) = _node("SlipstreamWanClipVisionEncode")(clip, image, "disabled", 1.0, True)
    (vae,) = _node("SlipstreamWanVAELoader")(assets.VAE, "fp32")
    (embeds,) = _node("SlipstreamWanImageToVideoEncode")(vae, image, 64, 48, 9, 0.0, True, False, clip_embeds)
    (encoder,) = _node("SlipstreamWanTextEncoderLoader")(assets.TEXT_ENCODER, "fp32", "offload_device")
    (text,) = _node("SlipstreamWanTextEncode")(encoder, "a woman speaks", "blurry", "gpu", True)
    args = (handle, embeds, text, 2, 5.0, 5.0, 1, "unipc", 1.0, True, "auto")
    g = torch.Generator().manual_seed(0)
    audio = ToyConditioning("multitalk", torch.randn(9, 8, generator=g))
    with_audio = _node("SlipstreamWanSampler")(*args, audio_embeds=audio, audio_cfg=4.0)[0]["samples"]
    other = _node("SlipstreamWanSampler")(*args, audio_embeds=audio.null(), audio_cfg=4.0)[0]["samples"]
    assert with_audio.shape == (1, 16, 3, 6, 8) and (with_audio - other).abs().max() > 1e-4
    (plain,) = _node("SlipstreamWanModelLoader")(assets.DIT_I2V, "fp32", "disabled", "main_device")
    with pytest.raises(ValueError, match="no speech model attached"):
        _node("SlipstreamWanSampler")(plain, *args[1:], audio_embeds=audio)


def test_fp8_storage_covers_the_speech_weights(wan_dirs):
    _, handle = _load("fp8_e4m3fn")
    layer = handle.dit.blocks[1].toy_audio
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale is not None
    assert handle.dit.audio_adapter.proj.weight.dtype == torch.float32, "the projector stays in the compute dtype"
    assert "blocks.1.toy_audio.weight" in handle.dit.quantizable_keys()


def test_int8_quantization_covers_the_speech_weights(wan_dirs):
    _, handle = _load("int8_w8a8")
    assert handle.dit.blocks[0].toy_audio.weight.dtype == torch.int8
    assert handle.dit.blocks[0].self_attn.q.weight.dtype == torch.int8
    assert handle.dit.audio_adapter.proj.weight.dtype == torch.float32


def test_loader_lora_still_merges_with_a_speech_model(wan_dirs):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 256, generator=g), torch.randn(256, 4, generator=g)
    lora = wan_dirs / "models" / "loras" / "speech_test_lora.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a,
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": b,
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0)}, str(lora))
    (chain,) = _node("SlipstreamWanLoraSelect")(lora.name, 0.5)
    _, plain = _load()
    _, merged = _load(lora=chain)
    delta = merged.dit.blocks[0].self_attn.q.weight - plain.dit.blocks[0].self_attn.q.weight
    assert torch.allclose(delta, 0.5 * b @ a, atol=1e-4)
    assert torch.equal(merged.dit.blocks[0].toy_audio.weight, plain.dit.blocks[0].toy_audio.weight)


def test_block_swap_carries_the_speech_weights(wan_dirs):
    (swap,) = _node("SlipstreamWanBlockSwap")(2, False, False, False, 1)
    _, swapped = _load(block_swap_args=swap)
    _, resident = _load()
    assert swapped.host_blocks is not None and swapped.host_blocks.host_bytes > 0
    g = torch.Generator().manual_seed(0)
    cfg = resident.config
    text = WanTextEmbeds((torch.randn(4, cfg.text_dim, generator=g),), torch.randn(3, cfg.text_dim, generator=g))
    y = torch.randn(20, 3, 6, 8, generator=g)
    image = WanImageEmbeds(64, 48, 9, y=y, clip=torch.randn(1, 257, cfg.clip_dim, generator=g))
    extras = SamplingExtras(audio=ToyConditioning("multitalk", torch.randn(9, 8, generator=g)), audio_cfg=3.0)
    settings = SamplerSettings(steps=2, cfg=4.0, seed=2)
    a = sample_video_full(swapped, text, image, settings, device=torch.device("cpu"), extras=extras).latent
    b = sample_video_full(resident, text, image, settings, device=torch.device("cpu"), extras=extras).latent
    assert torch.equal(a, b), "swapped blocks bring their speech weights along"


def test_speech_model_on_a_text_to_video_model_surfaces_the_family_error(wan_dirs):
    with pytest.raises(ValueError, match="needs an I2V model"):
        _load(model=assets.DIT_T2V)
