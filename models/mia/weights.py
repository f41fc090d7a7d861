"""MIA checkpoint files: read the published .pth once, convert to safetensors, load fast after that.

The published files are `torch.save({"model": state_dict})` pickles of ~425-525 MB each. They are
read with `weights_only=True` (no arbitrary code) exactly once, checked against the architecture,
and rewritten as safetensors carrying the network name and its PCAEConfig in the metadata, so
every later load is a memory-mapped read that never unpickles, and a miniature test network
reloads into its own shapes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import torch
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, check_state_dict, load_state_dict, read_safetensors_header
from ..hub import HubFile, HubSource, Progress, ensure_files
from .networks import (
    NETWORK_NAMES,
    PCAE,
    PCAEConfig,
    adapt_state_dict,
    build_network,
    expected_shapes,
    reset_buffers,
    set_attention_backend,
)

FORMAT_TAG = "slipstream.mia.v1"


def read_pth(path: str) -> dict[str, torch.Tensor]:
    """The plain tensor state dict of a published .pth ({"model": sd} or a bare sd), read weights-only,
    without the keys older checkpoints carry for buffers the architecture now computes."""
    return adapt_state_dict(load_state_dict(path))


def check_network(name: str, state_dict: dict[str, torch.Tensor], config: PCAEConfig, source: str) -> None:
    """Raise CheckpointError naming the differences if keys or shapes do not match the network."""
    check_state_dict(expected_shapes(name, config), state_dict,
                     f"the MIA '{name}' network ('{source}'; expected {name}.pth from the Make-It-Animatable release)")


def save_network_file(state_dict: dict[str, torch.Tensor], name: str, config: PCAEConfig, path: str) -> None:
    """Write a safetensors file atomically (temporary name, then rename) with name/config metadata."""
    meta = {"format": FORMAT_TAG, "mia_network": name, "mia_config": json.dumps(config.to_dict())}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def convert_pth(pth_path: str, st_path: str, name: str, config: PCAEConfig | None = None) -> None:
    """Read a published .pth, check it against the architecture and store it as safetensors."""
    config = config or PCAEConfig()
    state_dict = read_pth(pth_path)
    check_network(name, state_dict, config, pth_path)
    save_network_file(state_dict, name, config, st_path)


def check_network_file(path: str, name: str) -> PCAEConfig:
    """The config of a converted network file, after checking its header (which network, every key
    and shape) without reading a tensor: cheap enough to vet a file long before it is loaded."""
    header, meta = read_safetensors_header(path)
    stored = meta.get("mia_network")
    if stored is not None and stored != name:
        raise CheckpointError(f"'{path}' holds the MIA '{stored}' network, not '{name}'.")
    config = PCAEConfig.from_dict(json.loads(meta["mia_config"])) if "mia_config" in meta else PCAEConfig()
    check_network(name, {k: torch.empty(v["shape"], device="meta") for k, v in header.items()}, config, path)
    return config


def read_network_file(path: str, name: str) -> tuple[dict[str, torch.Tensor], PCAEConfig]:
    """Tensors and config of a converted network file, with clear errors for wrong or damaged files."""
    config = check_network_file(path, name)
    return load_state_dict(path), config


def load_network(path: str, name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 attn_backend: str = "sdpa") -> PCAE:
    """Build a network on `meta` and take the file's tensors as its weights (no random init)."""
    if name not in NETWORK_NAMES:
        raise ValueError(f"Unknown MIA network '{name}'. Valid names: {', '.join(NETWORK_NAMES)}.")
    state_dict, config = read_network_file(path, name)
    model = build_network(name, config, device="meta")
    # The Fourier basis stays fp32: 2^7*pi rounded to bf16 would shift every high-frequency feature.
    state_dict = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and not k.endswith("basis")
                          else v.dtype)
                  for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    reset_buffers(model, device)
    set_attention_backend(model, attn_backend)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- the published release on the hub

REPO_ID = "jasongzy/Make-It-Animatable"
REPO_FOLDER = "output/best/new"
SOURCE = HubSource(REPO_ID, None, "MIA models")


def hub_file(name: str) -> HubFile:
    return HubFile(f"{REPO_FOLDER}/{name}.pth", f"{name}.safetensors", f"{name}.pth")


def ensure_networks(directory: str, names: tuple[str, ...] = NETWORK_NAMES, progress: Progress | None = None,
                    check_interrupt: Callable[[], None] | None = None,
                    config: PCAEConfig | None = None) -> dict[str, str]:
    """{name: safetensors path} for the networks, downloading and converting what is missing.

    `config` is the architecture the .pth files must match (the published one unless given).
    """
    files = [hub_file(n) for n in names]

    def convert(src: str, dst: str, item: HubFile) -> None:
        convert_pth(src, dst, os.path.basename(dst).removesuffix(".safetensors"), config)

    paths = ensure_files(directory, SOURCE, files, convert, progress, check_interrupt)
    return {n: paths[hub_file(n).cached_name] for n in names}
