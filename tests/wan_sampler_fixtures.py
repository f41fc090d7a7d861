"""Shared helpers for the Wan sampler tests: a tiny random-weight T2V DiT (16-token text context,
so each forward takes milliseconds) and matching text embeds."""

from __future__ import annotations

from dataclasses import replace

import torch
from slipstream.models.wan import config as wan_config
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.pipeline import SwapSettings, WanModelHandle, WanTextEmbeds, build_host_blocks

CPU = torch.device("cpu")
TEXT_DIM = 32


def tiny_handle(layers: int = 2, seed: int = 1, name: str | None = None,
                swap: SwapSettings | None = None) -> WanModelHandle:
    cfg = replace(wan_config.tiny("t2v", num_layers=layers, text_dim=TEXT_DIM), text_len=16)
    dit = WanDiT(cfg).eval().requires_grad_(False)
    dit.load_state_dict(random_state_dict(cfg, seed=seed))
    host = build_host_blocks(dit, swap) if swap else None
    return WanModelHandle(dit, name or cfg.name, CPU, swap=swap, host_blocks=host)


def tiny_text() -> WanTextEmbeds:
    g = torch.Generator().manual_seed(0)
    return WanTextEmbeds((torch.randn(5, TEXT_DIM, generator=g),), torch.randn(3, TEXT_DIM, generator=g))
