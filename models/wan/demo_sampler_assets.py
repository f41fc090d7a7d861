"""Tiny files for the sampler demos: a tiny T2V DiT deep enough for the Skip Layer Guidance example
(block 9 exists) with a step-distill-style LoRA for it, a pair of tiny Wan 2.2 A14B T2V experts
(the 14B layout at tiny width: two t2v DiTs with their own weights), and a pair of tiny Wan 2.2 Fun
A14B Control experts (52 input channels, no CLIP, the 16-channel reference adapter). The other tiny Wan files come
from models/wan/demo_assets.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from . import config as wan_config
from .demo_assets import _save, write_tiny_wan_models
from .dit import random_state_dict
from .t5 import TINY_UMT5

DISTILL_DIT = "wan_tiny_t2v_10_blocks.safetensors"
DISTILL_LORA = "wan_tiny_distill_lora.safetensors"
DISTILL_BLOCKS = 10
A14B_HIGH = "wan_tiny_a14b_t2v_high_noise.safetensors"
A14B_LOW = "wan_tiny_a14b_t2v_low_noise.safetensors"
FUN22_HIGH = "wan_tiny_fun22_control_high_noise.safetensors"
FUN22_LOW = "wan_tiny_fun22_control_low_noise.safetensors"


def write_tiny_distill_lora(models_root: Path, rank: int = 4, seed: int = 21) -> None:
    """The 10-block tiny DiT and a small LoRA (diffusion-pipe naming) on every block's self-attention
    q/v and first FFN layer."""
    config = wan_config.tiny("t2v", num_layers=DISTILL_BLOCKS, text_dim=TINY_UMT5.dim)
    _save(random_state_dict(config, seed=20), Path(models_root) / "diffusion_models" / DISTILL_DIT)
    g = torch.Generator().manual_seed(seed)
    dim, ffn = config.dim, config.ffn_dim
    sd: dict[str, torch.Tensor] = {}
    for block in range(config.num_layers):
        for module, (out_f, in_f) in {"self_attn.q": (dim, dim), "self_attn.v": (dim, dim),
                                      "ffn.0": (ffn, dim)}.items():
            key = f"diffusion_model.blocks.{block}.{module}"
            sd[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.05
            sd[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.05
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
    _save(sd, Path(models_root) / "loras" / DISTILL_LORA)


def write_tiny_a14b_experts(models_root: Path) -> None:
    """Two tiny t2v experts of the same layout (high noise, low noise), different random weights."""
    config = wan_config.tiny("t2v", text_dim=TINY_UMT5.dim)
    root = Path(models_root) / "diffusion_models"
    _save(random_state_dict(config, seed=31), root / A14B_HIGH)
    _save(random_state_dict(config, seed=32), root / A14B_LOW)


def write_tiny_fun22_control_experts(models_root: Path) -> None:
    """Two tiny Wan 2.2 Fun A14B Control experts (the released layout at tiny width)."""
    config = replace(wan_config.tiny("i2v", text_dim=TINY_UMT5.dim, image_context=False), in_dim=52, ref_in_dim=16)
    root = Path(models_root) / "diffusion_models"
    _save(random_state_dict(config, seed=33), root / FUN22_HIGH)
    _save(random_state_dict(config, seed=34), root / FUN22_LOW)


def prepare_distill_demo(models_root: Path, input_root: Path) -> None:
    write_tiny_wan_models(models_root, input_root, image_to_video=False)
    write_tiny_distill_lora(models_root)


def prepare_a14b_demo(models_root: Path, input_root: Path) -> None:
    write_tiny_wan_models(models_root, input_root, image_to_video=False)
    write_tiny_a14b_experts(models_root)


def prepare_fun22_control_demo(models_root: Path, input_root: Path) -> None:
    write_tiny_wan_models(models_root, input_root)
    write_tiny_fun22_control_experts(models_root)
