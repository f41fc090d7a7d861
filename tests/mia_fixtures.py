"""Shared helpers for the MIA tests: miniature networks of the real architecture, and spec parsing."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from slipstream.models.mia.networks import NETWORK_NAMES, PCAEConfig, build_network

# The fact sheet in tests/data/mia_state_dict_shapes.txt: every key and shape of the
# five published networks.
SHAPES_FILE = Path(__file__).resolve().parent / "data" / "mia_state_dict_shapes.txt"

TINY = PCAEConfig(dim=64, depth=2, heads=2, dim_head=32, num_latents=64, num_points=1024, head_depth=2,
                  head_heads=2, head_ff=128)


def tiny_networks(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {name: build_network(name, TINY) for name in NETWORK_NAMES}


def parse_shapes(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{network: {key: shape}} from mia_state_dict_shapes.txt, expanding {i} (24 layers) and {j} (8)."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"=== (\w+): (\d+) tensors", line)
        if m:
            current = m.group(1)
            out[current] = {}
            continue
        m = re.match(r"\s+(\S+)\s+\(([\d, ]*)\) x(\d+)", line)
        if m and current:
            key, count = m.group(1), int(m.group(3))
            shape = tuple(int(x) for x in m.group(2).split(",") if x.strip())
            indices = range(count) if ("{i}" in key or "{j}" in key) else [None]
            for i in indices:
                out[current][key.replace("{i}", str(i)).replace("{j}", str(i))] = shape
    return out
