"""NaN/inf weights refused when a file loads, NaN/inf and out-of-range settings refused (or rounded with a
notice) when a node is called directly, as API clients do past ComfyUI's widget limits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from slipstream import host
from slipstream.models.checkpoint import load_state_dict
from slipstream.models.common.loading import read_safetensors
from slipstream.models.finite import BadSettingError, NonFiniteError, is_finite_tensor
from slipstream.models.wan.config import tiny
from slipstream.models.wan.demo_assets import tiny_vae_state_dict
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.pipeline import WanTextEmbeds
from slipstream.models.wan.vae import WanVAE
from slipstream.nodes import wan_encoders
from slipstream.nodes.wan import WanBlockSwap, WanLoraSelect
from slipstream.nodes.wan_encoders import (
    WanClipVisionEncode,
    WanDecode,
    WanEmptyEmbeds,
    WanImageToVideoEncode,
    WanTextEncode,
)
from slipstream.nodes.wan_options import WanEnhanceVideo

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from bad_input_cases import BadInput, assert_bad_input, cases_param  # noqa: E402

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_one_bad_value_is_found_in_every_float_dtype(dtype):
    t = torch.randn(300, 7).to(dtype)
    assert is_finite_tensor(t)
    t[123, 4] = NAN if dtype != torch.float8_e5m2 else INF
    assert not is_finite_tensor(t)
    assert is_finite_tensor(torch.full((3,), 7, dtype=torch.int8)) and is_finite_tensor(torch.empty(0))


def _poisoned(sd: dict, key: str, value: float = NAN) -> dict:
    sd = dict(sd)
    bad = sd[key].clone()
    bad.view(-1)[bad.numel() // 2] = value
    sd[key] = bad
    return sd


def test_a_nan_dit_checkpoint_is_refused_naming_the_key(tmp_path):
    sd = random_state_dict(tiny(num_layers=1, text_dim=32))
    key = "blocks.0.ffn.0.weight"
    save_file(_poisoned(sd, key), tmp_path / "dit.safetensors")
    with pytest.raises(NonFiniteError, match=rf"dit.safetensors: tensor '{key}' holds NaN"):
        WanDiT.from_file(str(tmp_path / "dit.safetensors"))


def test_a_vae_with_inf_is_refused_through_the_streaming_reader(tmp_path):
    sd = tiny_vae_state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 8)
    save_file(_poisoned(sd, key, INF), tmp_path / "vae.safetensors")
    with pytest.raises(NonFiniteError, match=rf"tensor '{key}'"):
        WanVAE.from_file(str(tmp_path / "vae.safetensors"))
    with pytest.raises(NonFiniteError):
        list(read_safetensors(str(tmp_path / "vae.safetensors"), [key]))


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_a_nan_lora_or_pickled_checkpoint_is_refused(tmp_path, ext):
    sd = {"blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 8), "blocks.0.self_attn.q.lora_B.weight":
          torch.full((8, 4), NAN)}
    path = tmp_path / f"lora.{ext}"
    save_file(sd, path) if ext == "safetensors" else torch.save(sd, path)
    with pytest.raises(NonFiniteError, match="lora_B.weight' holds NaN or infinite values \\(32 of its 32"):
        load_state_dict(str(path))


def _notices():
    seen: list[str] = []
    return seen, host.add_notice_hook(lambda node, message: seen.append(f"{node}: {message}"))


def test_rounded_sizes_are_told_to_the_user():
    seen, remove = _notices()
    try:
        (embeds,) = WanEmptyEmbeds().make(70, 48, 10)
    finally:
        remove()
    assert (embeds.width, embeds.height, embeds.num_frames) == (64, 48, 9)
    assert seen == ["Wan: rounded size 70x48 -> 64x48 (multiples of 16); 10 frames -> 9 (Wan makes 1+4k frames)"]


def _text_encode_nan(tmp: Path) -> None:
    nan_rows = WanTextEmbeds((torch.full((3, 8), NAN),), torch.zeros(2, 8))
    original = wan_encoders.encode_text
    wan_encoders.encode_text = lambda *a, **k: nan_rows
    try:
        handle = type("Handle", (), {"encoder": type("Enc", (), {"blocks": [0]})()})()
        WanTextEncode().encode(handle, "a cat", "", "cpu", False)
    finally:
        wan_encoders.encode_text = original


NAN_LATENT = {"samples": torch.full((1, 16, 2, 4, 4), NAN)}


def _sample_with_nan_text(t, negative: bool) -> None:
    """The sampler's input check on embeds that an upstream node (or an API caller) filled with NaN."""
    from types import SimpleNamespace

    from slipstream.models.wan.pipeline import SamplerSettings, WanImageEmbeds, check_inputs

    good, bad = torch.zeros(3, 4096), torch.full((3, 4096), NAN)
    text = WanTextEmbeds((good,), bad) if negative else WanTextEmbeds((good, bad), None)
    handle = SimpleNamespace(config=tiny(), name="tiny.safetensors")
    check_inputs(handle, text, WanImageEmbeds(64, 48, 5), None, SamplerSettings())

CASES = [
    BadInput("empty-embeds-0-frames", lambda t: WanEmptyEmbeds().make(64, 48, 0), BadSettingError,
             ("num_frames", "at least 1")),
    BadInput("empty-embeds-negative-frames", lambda t: WanEmptyEmbeds().make(64, 48, -7), BadSettingError,
             ("num_frames", "-7")),
    BadInput("empty-embeds-0-width", lambda t: WanEmptyEmbeds().make(0, 48, 5), BadSettingError,
             ("width", "at least 16")),
    BadInput("empty-embeds-negative-width", lambda t: WanEmptyEmbeds().make(-64, 48, 5), BadSettingError,
             ("width", "-64")),
    BadInput("empty-embeds-float-height", lambda t: WanEmptyEmbeds().make(64, 47.5, 5), BadSettingError,
             ("height", "whole number")),
    BadInput("block-swap-negative-blocks", lambda t: WanBlockSwap().make(-5, False, False, True, 1), BadSettingError,
             ("blocks_to_swap", "-5")),
    BadInput("block-swap-negative-prefetch", lambda t: WanBlockSwap().make(4, False, False, True, -1),
             BadSettingError, ("prefetch_blocks", "-1")),
    BadInput("feta-weight-nan", lambda t: WanEnhanceVideo().make(NAN, 0.0, 1.0), NonFiniteError,
             ("weight", "finite")),
    BadInput("feta-end-inf", lambda t: WanEnhanceVideo().make(2.0, 0.0, INF), NonFiniteError,
             ("end_percent", "finite")),
    BadInput("clip-vision-strength-nan", lambda t: WanClipVisionEncode().encode(None, torch.rand(1, 8, 8, 3),
                                                                                 "disabled", NAN, True),
             NonFiniteError, ("strength", "finite")),
    BadInput("i2v-noise-aug-inf", lambda t: WanImageToVideoEncode().encode(None, torch.rand(1, 8, 8, 3), 64, 48, 5,
                                                                            INF, True, False),
             NonFiniteError, ("noise_aug_strength", "finite")),
    BadInput("decode-nan-latent", lambda t: WanDecode().decode(None, NAN_LATENT, False, 272, 64, True),
             NonFiniteError, ("samples", "NaN", "bf16")),
    BadInput("text-encode-nan-embeds", _text_encode_nan, NonFiniteError, ("text_embeds", "fp16")),
    BadInput("sampler-nan-prompt-embeds", lambda t: _sample_with_nan_text(t, False), NonFiniteError,
             ("text_embeds (prompt 2)", "NaN")),
    BadInput("sampler-nan-negative-embeds", lambda t: _sample_with_nan_text(t, True), NonFiniteError,
             ("text_embeds (negative prompt)", "NaN")),
    BadInput("lora-strength-nan", lambda t: WanLoraSelect().select("any.safetensors", NAN), NonFiniteError,
             ("strength", "finite")),
]


@cases_param(CASES)
def test_non_finite_and_out_of_range_settings_are_refused(case, tmp_path):
    assert_bad_input(case, tmp_path)
