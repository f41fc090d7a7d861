"""Rectified-flow arithmetic shared by the Wan sampler and Anima's trainer and model sampling."""

from __future__ import annotations

from typing import TypeVar

import torch

Sigma = TypeVar("Sigma", float, torch.Tensor)


def shift_sigma(sigma: Sigma, shift: float) -> Sigma:
    """The timestep shift of SD3-style flow models (ComfyUI's time_snr_shift): shift·σ / (1 + (shift−1)·σ).

    A shift above 1 spends more of the schedule at high noise, where large images need it.
    """
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)
