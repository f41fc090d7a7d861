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
import pickle
import tempfile
import zipfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

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


class CheckpointError(ValueError):
    """A checkpoint file that is not what its name says (wrong file, truncated, wrong shapes)."""


def read_pth(path: str) -> dict[str, torch.Tensor]:
    """The plain tensor state dict of a published .pth ({"model": sd} or a bare sd)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(
            f"Cannot read '{path}' as a PyTorch checkpoint ({reason}). The file is truncated, corrupt or not a "
            "checkpoint: delete it and download it again.") from exc
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"'{path}' holds no tensor state dict (expected {{'model': state_dict}}).")
    return adapt_state_dict(data)


def check_state_dict(name: str, state_dict: dict[str, torch.Tensor], config: PCAEConfig, source: str) -> None:
    """Raise CheckpointError naming the first differences if keys or shapes do not match the network."""
    want = expected_shapes(name, config)
    missing = [k for k in want if k not in state_dict]
    extra = [k for k in state_dict if k not in want]
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs network {want[k]}"
             for k in want if k in state_dict and tuple(state_dict[k].shape) != want[k]]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shapes (e.g. {'; '.join(wrong[:3])})")
        raise CheckpointError(f"'{source}' is not the MIA '{name}' network: keys " + ", ".join(parts) +
                              f". Expected the file {name}.pth from the Make-It-Animatable release.")


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
    check_state_dict(name, state_dict, config, pth_path)
    save_network_file(state_dict, name, config, st_path)


def read_network_file(path: str, name: str) -> tuple[dict[str, torch.Tensor], PCAEConfig]:
    """Tensors and config of a converted network file, with clear errors for wrong or damaged files."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state_dict = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read '{path}' ({exc}). The file is truncated or corrupt: delete it and "
                              "load again to re-create it.") from exc
    stored = meta.get("mia_network")
    if stored is not None and stored != name:
        raise CheckpointError(f"'{path}' holds the MIA '{stored}' network, not '{name}'.")
    config = PCAEConfig.from_dict(json.loads(meta["mia_config"])) if "mia_config" in meta else PCAEConfig()
    check_state_dict(name, state_dict, config, path)
    return state_dict, config


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
