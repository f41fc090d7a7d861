"""Regular Hadamard rotations in groups along the last axis (ConvRot).

Why rotate: a few activation channels that are 30× larger than the rest make a per-row int8 scale
useless for every other channel. Rotating groups of channels with an orthogonal matrix spreads such
an outlier over the whole group, and since (x·H)(W·Hᵀ)ᵀ = x·Wᵀ the layer's output is unchanged.

The matrix is the one ComfyUI and comfy-kitchen write into `int8_tensorwise` files with
`"convrot": true`: Kronecker powers of R4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]] divided
by √g, so only powers of 4 are valid group sizes. H is symmetric and orthogonal (H·H = I), so one
function rotates a weight, rotates an activation and undoes either. The rotation runs in fp32:
files that were rotated in fp32 are only reproduced bit for bit that way.
"""

from __future__ import annotations

import functools

import torch

DEFAULT_GROUP = 256
_R4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def is_valid_group(group: int) -> bool:
    """True for 4, 16, 64, 256, 1024, …: the sizes a regular Hadamard matrix exists for here."""
    if group < 4:
        return False
    while group % 4 == 0:
        group //= 4
    return group == 1


@functools.lru_cache(maxsize=32)
def _hadamard_cached(group: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    r4 = torch.tensor(_R4, dtype=torch.float64)
    h = r4
    while h.shape[0] < group:
        h = torch.kron(h, r4)
    return (h / group ** 0.5).to(device=device, dtype=dtype)


def regular_hadamard(group: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised regular Hadamard matrix of size `group` (cached per device and dtype)."""
    if not is_valid_group(group):
        raise ValueError(f"ConvRot group size must be a power of 4 (16, 64, 256, …); got {group}.")
    return _hadamard_cached(group, str(torch.device(device)), dtype)


def pick_group(in_features: int, preferred: int = DEFAULT_GROUP) -> int:
    """The largest valid group ≤ `preferred` that divides `in_features`, or 0 when none ≥ 16 does."""
    group = preferred
    while group >= 16:
        if in_features % group == 0 and is_valid_group(group):
            return group
        group //= 4
    return 0


def rotate(t: torch.Tensor, group: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """t [..., K] with every group of `group` consecutive channels multiplied by H (fp32 result).

    The same call rotates weights (W·Hᵀ, H symmetric), activations (x·H) and undoes a rotation.
    """
    k = t.shape[-1]
    if k % group:
        raise ValueError(f"cannot rotate {k} channels in groups of {group}: {k} is not a multiple of {group}.")
    h = regular_hadamard(group, t.device, torch.float32)
    grouped = t.reshape(-1, group)
    if grouped.dtype != torch.float32:
        grouped = grouped.float()
    if out is None:
        return torch.mm(grouped, h).reshape(t.shape)
    torch.mm(grouped, h, out=out.view(-1, group))
    return out
