"""The pieces of ComfyUI's `BaseModel` the Anima nodes use, for running outside ComfyUI.

ComfyUI wraps a diffusion model with its latent format and model sampling; the nodes read
`process_latent_in`, `model_sampling.{shift, multiplier, percent_to_sigma}` and `diffusion_model`
from that wrapper. `AnimaModel` offers the same names so the node code is host-independent.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.flow import shift_sigma
from ..wan.vae import denormalize_latent, normalize_latent
from .dit import AnimaDiT

ANIMA_SHIFT = 3.0
ANIMA_MULTIPLIER = 1.0


class FlowSampling(nn.Module):
    """Rectified-flow sampling as ComfyUI's ModelSamplingDiscreteFlow (CONST): sigma in [0, 1]."""

    def __init__(self, shift: float = ANIMA_SHIFT, multiplier: float = ANIMA_MULTIPLIER):
        super().__init__()
        self.shift = float(shift)
        self.multiplier = float(multiplier)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return shift_sigma(t, self.shift)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.multiplier

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor(1.0 - percent)))

    @staticmethod
    def calculate_denoised(sigma: torch.Tensor, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x - sigma * velocity


class AnimaModel(nn.Module):
    """diffusion_model + Wan 2.1 latent format + flow sampling (shift 3, multiplier 1)."""

    def __init__(self, diffusion_model: AnimaDiT, shift: float = ANIMA_SHIFT):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = FlowSampling(shift)

    @staticmethod
    def process_latent_in(latent: torch.Tensor) -> torch.Tensor:
        return normalize_latent(latent)

    @staticmethod
    def process_latent_out(latent: torch.Tensor) -> torch.Tensor:
        return denormalize_latent(latent)

    def apply_model(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                    transformer_options: dict | None = None, **kwargs) -> torch.Tensor:
        """Denoised x0 estimate, like ComfyUI's BaseModel.apply_model (x and the result are normalised latents)."""
        options = dict(transformer_options or {})
        options.setdefault("sigmas", sigma)
        dm = self.diffusion_model
        dtype = next(dm.parameters()).dtype
        dtype = dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32
        velocity = dm(x.to(dtype), self.model_sampling.timestep(sigma).to(dtype), context.to(dtype),
                      transformer_options=options, **kwargs)
        return self.model_sampling.calculate_denoised(sigma.view(-1, 1, 1, 1, 1), velocity.float(), x.float())
