"""A stable DRAM cache key for a model that no loader of ours registered, derived from its weights.

Why: core ComfyUI loaders (Load CLIP, Load Checkpoint, ...) keep no file path on the object they
return (checked for ComfyUI v0.8.0: comfy.sd.CLIP and its ModelPatcher hold only the module), so
the only thing that identifies "the same text encoder as last run" is its contents. Hashing every
byte of a multi-GB encoder on every offload would cost seconds, so the fingerprint reads:

- every tensor's name, shape and dtype (the architecture and the file's layout), and
- `SAMPLES_PER_TENSOR` values of *every* tensor, at positions fixed by the tensor's name and size
  (spread over the whole tensor, offset by a hash of the name so equal-sized tensors are not all
  sampled at the same indices). Values are compared bit for bit.

That is a few hundred scalar reads for a whole encoder (CLIP-L has 196 tensors, T5-XXL ~220): one
small gather and copy to the CPU per tensor, whichever device each tensor sits on (the digest must
not depend on where ComfyUI placed the weights, so values are hashed in name order, never grouped).

Collision reasoning. Two files of the same architecture collide only if every sampled value is bitwise
equal. Different trainings, fine-tunes, merges or dtype conversions change essentially every weight,
so they differ at the first sample. What can collide is an edit confined to a few elements of a
tensor (e.g. new rows added to a token embedding) that misses every sampled position. A collision
is harmless here by construction: a fingerprint key is never looked up by a loader to *serve* an
object; it only names the entry of the module the Offload node was given (held by weak reference).
At worst two such CLIPs share one dram_id in the report; neither is ever handed the other's weights.

Weights that were never loaded (a file missing keys leaves ComfyUI's tensors uninitialised) can
change between loads, and so can their fingerprint: that is correct, their contents did change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

SAMPLES_PER_TENSOR = 8


def _offset(name: str, numel: int) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little") % numel


def sample_positions(name: str, numel: int, count: int = SAMPLES_PER_TENSOR) -> list[int]:
    """`count` flat positions spread evenly over a tensor of `numel` elements, shifted by a hash of its
    name; every position when the tensor is that small. Deterministic: same name and size, same list."""
    if numel <= count:
        return list(range(numel))
    start = _offset(name, numel)
    return sorted({(start + i * numel // count) % numel for i in range(count)})


def _sampled_bytes(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """The sampled values as raw bytes (uint8, on the tensor's device), or None when they cannot be read:
    meta tensors, and tensor subclasses (quantized layouts) that refuse element indexing."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    try:
        flat = torch.tensor(sample_positions(name, tensor.numel()), dtype=torch.long, device=tensor.device)
        index = torch.unravel_index(flat, tuple(tensor.shape)) if tensor.ndim > 1 else (flat,)
        values = tensor.detach()[index] if tensor.ndim > 0 else tensor.detach().reshape(1)
        values = values.contiguous()
        return values.view(torch.uint8).reshape(-1) if values.dtype != torch.bool else values.to(torch.uint8)
    except (RuntimeError, TypeError, NotImplementedError, IndexError):
        return None


def weights_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hex digest (16 chars) of names, shapes, dtypes and sampled values of `tensors`, in name order."""
    items = sorted(tensors, key=lambda item: item[0])
    if not items:
        raise ValueError("cannot fingerprint a model with no weights")
    digest = hashlib.sha256()
    sampled: list[torch.Tensor] = []
    for name, tensor in items:
        values = _sampled_bytes(name, tensor)
        layout = f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{'-' if values is None else values.numel()}\n"
        digest.update(layout.encode("utf-8"))
        if values is not None:
            sampled.append(values.to("cpu"))
    if sampled:
        digest.update(torch.cat(sampled).numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_key(kind: str, class_name: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """`kind:weights:Class@digest`: the same weights give the same key in every run and process."""
    if not kind or ":" in kind:
        raise ValueError(f"DRAM key kind must be a non-empty word without ':', got {kind!r}")
    return f"{kind}:weights:{class_name}@{weights_fingerprint(tensors)}"
