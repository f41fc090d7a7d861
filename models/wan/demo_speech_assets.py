"""Tiny files for the speech-video demos (MultiTalk one and two speakers, FantasyTalking): a tiny wav2vec2
speech encoder under the Hugging Face key names, tiny MultiTalk and FantasyTalking speech models under
their official names for the tiny I2V DiT, and short synthetic speech-like WAV files for core Load Audio.

The other tiny Wan files (I2V DiT, umT5, VAE, CLIP vision, start image) come from demo_assets.py.
"""

from __future__ import annotations

import math
import os
import wave
from pathlib import Path

import torch

from ..audio.wav2vec2 import Wav2Vec2, Wav2Vec2Config
from . import config as wan_config
from .demo_assets import _demo_draw, _save, seeded_state_dict, tiny_clip_config, write_tiny_wan_models
from .fantasytalking import expected_shapes
from .multitalk import multitalk_keys
from .t5 import TINY_UMT5

SPEECH_ENCODER = "chinese-wav2vec2-base-tiny.safetensors"     # models/audio_encoders (MultiTalk)
SPEECH_ENCODER_960H = "wav2vec2-base-960h-tiny.safetensors"    # the same weights (FantasyTalking's encoder name)
MULTITALK = "multitalk_tiny.safetensors"                       # models/diffusion_models
FANTASYTALKING = "fantasytalking_tiny.safetensors"
SPEECH_1 = "speech_demo_1.wav"                                 # input/
SPEECH_2 = "speech_demo_2.wav"
SAMPLE_RATE = 16000

# conv stack 10/3/2 with strides 5/2/2: 20 samples a frame; 2 transformer layers, 128 wide
TINY_WAV2VEC2 = Wav2Vec2Config(conv_dim=(32, 32, 32), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2),
                               hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256,
                               pos_conv_kernel=16, pos_conv_groups=4)
MULTITALK_FRAME_WIDTH = TINY_WAV2VEC2.num_layers * TINY_WAV2VEC2.hidden_size   # every hidden state but the first


def tiny_i2v_config() -> wan_config.WanDiTConfig:
    """The demos' tiny I2V DiT (demo_assets.DIT_I2V)."""
    return wan_config.tiny("i2v", text_dim=TINY_UMT5.dim, clip_dim=tiny_clip_config().dim)


def write_speech_wav(path: Path, seconds: float, pitch: float = 140.0, seed: int = 0,
                     sample_rate: int = SAMPLE_RATE) -> None:
    """A speech-like 16-bit PCM WAV: a voiced harmonic tone whose loudness rises and falls in syllables."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    syllables = 0.5 + 0.5 * torch.sin(2 * math.pi * (3.0 + torch.rand(1, generator=g)) * t).clamp(min=0)
    voice = sum(torch.sin(2 * math.pi * pitch * k * t) / k for k in range(1, 6))
    signal = 0.3 * syllables * voice + 0.01 * torch.randn(t.shape, generator=g)
    pcm = (signal.clamp(-1, 1) * 32767).round().to(torch.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.numpy().tobytes())
    os.replace(tmp, path)


def tiny_wav2vec2_state_dict(seed: int = 41) -> dict[str, torch.Tensor]:
    """Random tiny wav2vec2 weights under the HF Wav2Vec2Model names (fused positional conv weight)."""
    return seeded_state_dict(lambda: Wav2Vec2(TINY_WAV2VEC2), seed, _demo_draw)


def tiny_multitalk_state_dict(config: wan_config.WanDiTConfig, seed: int = 42) -> dict[str, torch.Tensor]:
    """Random MultiTalk weights for `config` fed by the tiny wav2vec2 (2 hidden states of 128 a frame)."""
    shapes = multitalk_keys(dim=config.dim, num_layers=config.num_layers, frame_width=MULTITALK_FRAME_WIDTH,
                            intermediate=64, audio_dim=32, context_tokens=4)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        sd[key] = 1.0 + 0.1 * noise if key.endswith("norm.weight") or key.endswith("norm_x.weight") else \
            0.02 * noise if len(shape) < 2 else noise / math.sqrt(shape[1])
    return sd


def tiny_fantasytalking_state_dict(config: wan_config.WanDiTConfig, seed: int = 43) -> dict[str, torch.Tensor]:
    """Random FantasyTalking weights for `config` fed by the tiny wav2vec2's last hidden state (128 wide)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in expected_shapes(config.dim, config.num_layers, 64, TINY_WAV2VEC2.hidden_size).items():
        noise = torch.randn(shape, generator=g)
        sd[key] = 1.0 + 0.1 * noise if key.endswith("norm.weight") else \
            0.02 * noise if len(shape) < 2 else noise / math.sqrt(shape[-1])
    return sd


def write_speech_demo(models_root: Path, input_root: Path) -> None:
    """Every file the speech demos need, the tiny Wan files included."""
    models_root, input_root = Path(models_root), Path(input_root)
    write_tiny_wan_models(models_root, input_root)
    encoder = tiny_wav2vec2_state_dict()
    _save(encoder, models_root / "audio_encoders" / SPEECH_ENCODER)
    _save(encoder, models_root / "audio_encoders" / SPEECH_ENCODER_960H)
    config = tiny_i2v_config()
    _save(tiny_multitalk_state_dict(config), models_root / "diffusion_models" / MULTITALK)
    _save(tiny_fantasytalking_state_dict(config), models_root / "diffusion_models" / FANTASYTALKING)
    write_speech_wav(input_root / SPEECH_1, 1.2, pitch=140.0, seed=1)
    write_speech_wav(input_root / SPEECH_2, 0.8, pitch=210.0, seed=2)
