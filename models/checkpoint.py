"""Reading checkpoints: safetensors (preferred) and pickled .pth/.pt (weights only), with errors
that say what is wrong with the file and what to do.

A safetensors header is validated before any tensor is touched, so a truncated download or a
file of another format fails with a message instead of a crash deep inside a loader.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterable, Mapping

import torch

from .finite import check_state_dict as check_state_dict_finite

SAFETENSORS_EXTS = (".safetensors", ".sft")
PICKLE_EXTS = (".pth", ".pt", ".ckpt", ".bin")
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as what it claims to be, or lacks what a model needs."""


def read_safetensors_header(path: str) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor table, __metadata__) of a safetensors file, after checking it is whole."""
    size = _file_size(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file. Re-download it.")
        if _looks_like_html(head + f.read(504)):
            raise _html_page(path)
        f.seek(8)
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or n > size - 8:
            if 0 < n <= _MAX_HEADER and f.read(1) == b"{":  # a JSON header cut short: a partial copy
                raise CheckpointError(
                    f"{path}: truncated — its header needs {n} bytes but the file holds only {size - 8} after "
                    "the length field. The download or copy did not finish; fetch the file again.")
            raise CheckpointError(
                f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file). "
                "If it is a pickled PyTorch checkpoint, give it a .pth/.pt extension; otherwise re-download it.")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc}). The file is damaged.") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a table. The file is damaged.")
    metadata = _checked_metadata(header.pop("__metadata__", None), path)
    for name, info in header.items():
        _check_entry(name, info, path)
    data_len = size - 8 - n
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if end > data_len:
        missing = end - data_len
        raise CheckpointError(
            f"{path}: truncated — the header describes {end} bytes of tensor data but the file holds {data_len} "
            f"({missing} bytes missing). The download or copy did not finish; fetch the file again.")
    return header, dict(metadata)


def _damaged(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: damaged safetensors header — {what}. Fetch the file again, or re-save it "
                           "with the tool that made it.")


def _checked_metadata(metadata: object, path: str) -> dict[str, str]:
    """The __metadata__ table, which safetensors defines as string keys to string values."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise _damaged(path, f"__metadata__ is a {type(metadata).__name__}, not a table of strings")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise _damaged(path, f"__metadata__ entry {bad[0]!r} is not a string")
    return metadata


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(name: str, info: object, path: str) -> None:
    """A tensor entry: {"dtype": str, "shape": [int…], "data_offsets": [begin, end]} with begin <= end."""
    if not isinstance(info, dict):
        raise _damaged(path, f"the entry for tensor {name!r} is a {type(info).__name__}, not a table")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise _damaged(path, f"tensor {name!r} has no {key!r}")
    if not isinstance(info["dtype"], str):
        raise _damaged(path, f"tensor {name!r} has dtype {info['dtype']!r}, not a name")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _damaged(path, f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise _damaged(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")


def read_metadata(path: str) -> dict[str, str]:
    """The __metadata__ table of a safetensors file ({} for pickled checkpoints)."""
    if path.lower().endswith(SAFETENSORS_EXTS):
        return read_safetensors_header(path)[1]
    return {}


def tensor_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype string) without reading any tensor data."""
    header, _ = read_safetensors_header(path)
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}


def load_state_dict(path: str, device: str | torch.device = "cpu",
                    keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors (or just `keys`) of a checkpoint, on `device`.

    safetensors files are read through safe_open one tensor at a time (no second full copy in
    RAM); pickled files are loaded with weights_only=True so a checkpoint can never run code.
    A caller that converts most tensors and drops the originals reads with plain file reads
    instead (common.loading.read_safetensors, as the CPU int8 loader does): every mapped page it
    touched would stay resident for as long as any tensor still views the map.
    """
    lower = path.lower()
    if lower.endswith(PICKLE_EXTS):
        return dict(check_state_dict_finite(_load_pickle(path, device, keys), path))
    header, _ = read_safetensors_header(path)
    from safetensors import safe_open

    wanted = list(header) if keys is None else list(keys)
    absent = [k for k in wanted if k not in header]
    if absent:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(absent[:5])}" + (" …" if len(absent) > 5 else ""))
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for k in wanted:
                out[k] = f.get_tensor(k)
    except Exception as exc:  # safetensors raises its own error type for damaged data
        raise CheckpointError(f"{path}: could not read tensors ({exc}). The file is damaged; fetch it again.") from exc
    check_state_dict_finite(out, path)
    return out


def _load_pickle(path: str, device, keys) -> dict[str, torch.Tensor]:
    _file_size(path)
    with open(path, "rb") as f:
        start = f.read(512)
    if _looks_like_html(start):
        raise _html_page(path)
    # Only the zip format (torch >= 1.6) can be memory-mapped; legacy files are read whole, still weights-only.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(str(exc))
        if refused is None:
            raise _damaged_pickle(path, exc) from exc
        raise CheckpointError(
            f"{path}: refused by the weights-only loader — it holds Python objects or code ({refused}), not only "
            "tensors, and such a file is never unpickled here. Get a safetensors version of the model, or convert this one "
            "in an environment you trust.") from exc
    except Exception as exc:
        raise _damaged_pickle(path, exc) from exc
    sd = unwrap_state_dict(obj, path)
    if keys is not None:
        absent = [k for k in keys if k not in sd]
        if absent:
            raise CheckpointError(f"{path}: missing tensor(s) {', '.join(absent[:5])}"
                                  + (" …" if len(absent) > 5 else ""))
        sd = {k: sd[k] for k in keys}
    return sd


def _refused_global(message: str) -> str | None:
    """What torch's weights-only unpickler refused (a class or function the pickle names), or None
    when the failure was not such a refusal (bytes that are no pickle at all: a damaged file)."""
    if "weights only load failed" not in message.lower() or "WeightsUnpickler error:" not in message:
        return None
    detail = message.split("WeightsUnpickler error:", 1)[1].strip()
    detail = detail.split("\n", 1)[0].split(". ", 1)[0].strip()
    if not detail or detail.startswith("Unsupported operand"):
        return None
    return detail[:200]


def _looks_like_html(start: bytes) -> bool:
    head = start.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body"))


def _html_page(path: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: is a web page (HTML), not a model file — a failed or blocked download saved the server's "
        "error page under the model's name. Delete it and download the file again (log in or accept the "
        "licence on the site first if it asks).")


def _damaged_pickle(path: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: could not be read as a weights-only PyTorch checkpoint ({type(exc).__name__}: {exc}). "
        "The file is truncated or damaged; fetch it again.")


def unwrap_state_dict(obj, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the tensor table inside common checkpoint wrappers ({'model': …}, {'state_dict': …});
    a table of tensor tables is flattened to "outer.inner" keys."""
    for wrapper in ("state_dict", "model", "module", "ema"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Mapping) and v and all(
            isinstance(t, torch.Tensor) for t in v.values()) for v in obj.values()):
        # A table of tensor tables (FantasyTalking's {"proj_model": …, "audio_processor": …}):
        # flat "outer.inner" keys, the names the same model's safetensors files use.
        return {f"{outer}.{inner}": t for outer, table in obj.items() for inner, t in table.items()}
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no tensor table found in the checkpoint.")
    return dict(obj)


def _file_size(path: str) -> int:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file.")
    return os.path.getsize(path)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the first prefix that every key of interest carries; returns (state dict, prefix used).

    A prefix counts when at least half of the keys start with it (files sometimes carry a few
    extra top-level tensors such as `spiece_model`); keys without it are kept as they are.
    """
    for prefix in prefixes:
        hits = sum(1 for k in sd if k.startswith(prefix))
        if prefix and hits and hits * 2 >= len(sd):
            return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}, prefix
    return dict(sd), ""


def check_state_dict(expected: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor], what: str,
                     allow_extra: bool = False) -> None:
    """Raise CheckpointError naming missing, unexpected and wrongly shaped tensors."""
    missing = [k for k in expected if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
             for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    extra = [] if allow_extra else [k for k in sd if k not in expected]
    if not (missing or wrong or extra):
        return
    parts = [f"The checkpoint does not match {what}."]
    if missing:
        parts.append(f"Missing tensor(s): {', '.join(missing[:8])}" + (" …" if len(missing) > 8 else ""))
    if wrong:
        parts.append(f"Wrong shape: {'; '.join(wrong[:8])}" + (" …" if len(wrong) > 8 else ""))
    if extra:
        parts.append(f"Unexpected tensor(s): {', '.join(extra[:8])}" + (" …" if len(extra) > 8 else ""))
    parts.append("Check that the file is the right model for this loader.")
    raise CheckpointError("\n".join(parts))


def refuse_non_float(expected: Mapping[str, torch.dtype], stored: Mapping[str, torch.dtype], what: str) -> None:
    """Raise CheckpointError when a tensor the model holds in floating point is stored as an integer
    or bool type in the file (torch's own load_state_dict error names neither the file nor a fix)."""
    for key, want in expected.items():
        have = stored.get(key)
        if have is not None and want.is_floating_point and not have.is_floating_point:
            raise CheckpointError(
                f"{what}: tensor '{key}' is stored as {str(have).removeprefix('torch.')}, but the model holds "
                "floating-point weights there. The file is damaged or is not this model; use an "
                "fp32/fp16/bf16 (or fp8) checkpoint.")
