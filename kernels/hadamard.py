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


def _kron_factors(group: int) -> tuple[int, int]:
    """(a, b), a · b = group, both valid groups and a <= b as close as possible: H_group = H_a ⊗ H_b."""
    a = 4
    while (a * 4) ** 2 <= group:
        a *= 4
    return a, group // a


def rotate_kron(t: torch.Tensor, group: int, out: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """`rotate` for activations through H = H_a ⊗ H_b: each group viewed as an a×b block T becomes
    H_a·T·H_b — a + b multiply-adds per value instead of `group` (32 instead of 256), as two GEMMs
    in caller-owned fp32 buffers (`out`, `work`: t's shape, reused between calls so a big
    activation does not page-fault fresh memory in). Equal to `rotate` up to float rounding;
    weights keep `rotate`, whose exact products reproduce rotated files bit for bit.
    """
    k = t.shape[-1]
    if k % group:
        raise ValueError(f"cannot rotate {k} channels in groups of {group}: {k} is not a multiple of {group}.")
    if group < 16:
        return rotate(t, group, out=out)
    a, b = _kron_factors(group)
    src = t
    if t.dtype != torch.float32 or not t.is_contiguous():
        out.copy_(t)
        src = out
    torch.mm(src.view(-1, b), regular_hadamard(b, t.device), out=work.view(-1, b))
    torch.matmul(regular_hadamard(a, t.device), work.view(-1, a, b), out=out.view(-1, a, b))
    return out
