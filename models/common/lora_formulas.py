"""The weight differences of the LoRA families and DoRA's re-normalisation, in one place.

Merging adds `strength · ΔW` to a weight; running unmerged adds `strength · ΔW x` to a layer's
output. Both must agree on ΔW, so both take it from here:

- LoRA (LoCon):  ΔW = alpha/rank · up @ down            (rank = down's rows)
- LoHa:          ΔW = alpha/rank · (w1a @ w1b) ⊙ (w2a @ w2b)   (rank = w1b's rows)
- LoKr:          ΔW = alpha/rank · w1 ⊗ w2, each factor given whole or as a @ b
                 (rank = the rows of the last factor given as a product; alpha is ignored when
                 both are whole)
- DoRA:          W' = m · (W + ΔW) / ‖W + ΔW‖, the norm per output row when the magnitude `m`
                 has one value per output, else per input column; at a strength s the layer
                 gets W + s·(W' − W).

The Kronecker product is also applied to activations without being built (`kron_apply`):
(w1 ⊗ w2) x = vec(w1 · X · w2ᵀ) for x viewed as X [in1, in2], which keeps the run-time path as
small as the factors.
"""

from __future__ import annotations

import torch

# Added to DoRA's norm so an all-zero row or column cannot divide by zero.
NORM_EPS = float(torch.finfo(torch.float32).eps)


def lowrank_delta(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · up @ down in fp32, flattened to [out, in·k…] (conv LoRAs included)."""
    return (up.float().flatten(1) @ down.float().flatten(1)) * scale


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
               scale: float) -> torch.Tensor:
    """scale · (w1a @ w1b) ⊙ (w2a @ w2b) in fp32."""
    return (w1a.float() @ w1b.float()) * (w2a.float() @ w2b.float()) * scale


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · w1 ⊗ w2 in fp32."""
    return torch.kron(w1.float(), w2.float()) * scale


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(w1 ⊗ w2) applied to the last dim of x, without building the Kronecker product.

    w1 [a, b], w2 [c, d], x [..., b·d] -> [..., a·c].
    """
    b, d = w1.shape[1], w2.shape[1]
    grid = x.unflatten(-1, (b, d))
    return torch.matmul(torch.matmul(w1, grid), w2.t()).flatten(-2)


def dora_on_output_axis(magnitude: torch.Tensor, out_features: int) -> bool:
    """DoRA normalises per output row when its magnitude holds one value per output."""
    return magnitude.shape[0] == out_features and magnitude.numel() == out_features


def dora_ratio(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m / ‖W + ΔW‖ (fp32), shaped to broadcast over the [out, in] weight: [out, 1] or [1, in]."""
    patched = weight.float().flatten(1) + delta.float().flatten(1)
    if dora_on_output_axis(magnitude, patched.shape[0]):
        norm = patched.norm(dim=1, keepdim=True)
        return magnitude.float().reshape(-1, 1) / (norm + NORM_EPS)
    norm = patched.norm(dim=0, keepdim=True)
    return magnitude.float().reshape(1, -1) / (norm + NORM_EPS)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                strength: float) -> torch.Tensor:
    """W + s · (m · (W + ΔW)/‖W + ΔW‖ − W) in fp32, shaped like `weight`."""
    flat = weight.float().flatten(1)
    patched = (flat + delta.float().flatten(1)) * dora_ratio(weight, delta, magnitude)
    return (flat + strength * (patched - flat)).view(weight.shape)
