"""The speech encoder loader node: lists models/audio_encoders, loads a wav2vec2 file there into the
SpeechEncoder the embeds nodes take, with its input normalisation decided (or set) and said."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from slipstream.host import add_notice_hook
from slipstream.host.paths import ModelNotFoundError
from slipstream.models.audio import SpeechEncoder, multitalk_features
from slipstream.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from speech_fixtures import write_tiny_wav2vec2  # noqa: E402

NODE = "SlipstreamSpeechEncoderLoader"


@pytest.fixture
def models(tmp_path, monkeypatch):
    root = tmp_path / "models"
    write_tiny_wav2vec2(root / "audio_encoders" / "wav2vec2-chinese-base_fp16.safetensors", dtype=torch.float16)
    write_tiny_wav2vec2(root / "audio_encoders" / "960h" / "pytorch_model.bin", prefix="wav2vec2.", lm_head=32)
    write_tiny_wav2vec2(root / "audio_encoders" / "my-speech-model.safetensors")
    monkeypatch.setenv("SLIPSTREAM_MODELS", str(root))
    return root


def _load(*args, **kwargs):
    cls = NODE_CLASS_MAPPINGS[NODE]
    return getattr(cls(), cls.FUNCTION)(*args, **kwargs)


def test_registered_with_tooltips():
    cls = NODE_CLASS_MAPPINGS[NODE]
    assert NODE_DISPLAY_NAME_MAPPINGS[NODE] == "Load Speech Encoder (wav2vec2)"
    assert cls.RETURN_TYPES == ("SLIPSTREAM_SPEECH_ENCODER",) and cls.CATEGORY.startswith("Slipstream/")
    for name, (_, opts) in cls.INPUT_TYPES()["required"].items():
        assert opts.get("tooltip"), name


def test_lists_and_loads_the_folder(models):
    names = NODE_CLASS_MAPPINGS[NODE].INPUT_TYPES()["required"]["model_name"][0]
    assert names == ["960h/pytorch_model.bin", "my-speech-model.safetensors", "wav2vec2-chinese-base_fp16.safetensors"]
    (chinese,) = _load("wav2vec2-chinese-base_fp16.safetensors", "fp32", "offload_device")
    assert isinstance(chinese, SpeechEncoder) and chinese.dtype == torch.float32
    assert not chinese.expects_normalized and chinese.name == "wav2vec2-chinese-base_fp16"
    assert chinese.compute_device is not None and chinese.device.type == "cpu"
    (ctc,) = _load("960h/pytorch_model.bin", "bf16", "main_device")
    assert ctc.expects_normalized and ctc.dtype == torch.bfloat16
    assert multitalk_features(chinese, torch.randn(16000), num_frames=25).shape == (25, 2, 128)


def test_normalisation_choice_and_notice(models):
    seen = []
    remove = add_notice_hook(lambda node, message: seen.append(message))
    try:
        (guessed,) = _load("my-speech-model.safetensors", "fp32", "offload_device")
        (forced,) = _load("wav2vec2-chinese-base_fp16.safetensors", "fp32", "offload_device", "on")
    finally:
        remove()
    assert guessed.expects_normalized and any("normalize_input" in m for m in seen)
    assert forced.expects_normalized and len(seen) == 1
    with pytest.raises(ValueError, match="normalize_input"):
        _load("my-speech-model.safetensors", "fp32", "offload_device", "maybe")


def test_missing_file_names_the_folder(models):
    with pytest.raises(ModelNotFoundError, match="audio_encoders"):
        _load("chinese-wav2vec2-base.safetensors", "fp32", "offload_device")
