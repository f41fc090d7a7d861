"""Train per-block reference tokens on a frozen Anima DiT with the rectified-flow velocity loss.

Each step takes one reference latent (cycling through them), draws sigma the way Anima samples
(uniform t through the shift-3 warp, sigma = s·t / (1 + (s−1)·t)), noises x_sigma = (1−sigma)·x0 +
sigma·eps, and regresses the DiT's output on the velocity eps − x0 (optionally weighted by a mask
on the latent grid). Only the tokens receive gradients (Adam); the DiT's parameters are never
written. Noise, sigma and the initial tokens all come from one seeded CPU generator, so the same
seed gives the same tokens.

The caller supplies everything host-specific: the device, an interrupt check and a progress
callback — this module imports nothing from host/.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..common.flow import shift_sigma
from .context_tokens import context_dim_of, cross_attention_blocks, installed_tokens
from .errors import TokenOptimizationFailed

Progress = Callable[[int, int, float], None]      # (step done, total steps, loss of that step)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    learning_rate: float = 5e-3
    num_tokens: int = 8
    init_std: float = 0.02
    seed: int = 0
    dtype: torch.dtype = torch.bfloat16        # compute dtype of the DiT forward; tokens stay fp32
    shift: float = 3.0                          # Anima's sampling shift (ModelSamplingDiscreteFlow)
    multiplier: float = 1.0                     # timestep = sigma * multiplier (Anima: 1.0)
    eval_draws: int = 4                         # fixed (sigma, noise) draws scored before and after training


@dataclass(frozen=True)
class TrainResult:
    tokens: torch.Tensor                        # [num_blocks, num_tokens, context_dim], fp32, CPU
    initial_tokens: torch.Tensor
    losses: tuple[float, ...]
    eval_before: float                          # loss on the fixed draws with the initial tokens
    eval_after: float                           # ... and with the trained ones: the honest before/after

    def window_mean(self, first: bool) -> float:
        """Mean loss over the first or last tenth of the steps (single steps are noisy: random sigma)."""
        n = max(1, len(self.losses) // 10)
        part = self.losses[:n] if first else self.losses[-n:]
        return float(sum(part) / len(part))


def velocity_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared velocity error, optionally weighted per latent position.

    `weight` broadcasts over the latent ([1, 1, T, h, w]); a zero weight removes that position's
    error from both the value and the gradient. The weighted mean divides by the weight's sum
    (times channels), never by less than one position, so a nearly empty mask cannot blow up.
    """
    err = (prediction.float() - target.float()) ** 2
    if weight is None:
        return err.mean()
    w = weight.float().expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(err.shape[1])


def training_view(diffusion_model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.nn.Module, bool]:
    """The module to train against, and whether it is a private copy.

    ComfyUI loads weights inside inference mode; autograd refuses to save such tensors for
    backward, so a DiT holding any is deep-copied (outside inference mode the copy is an ordinary
    tensor). fp32 training on half-precision weights also needs a copy, because autocast can only
    narrow. Otherwise the caller's module is used as it is (its weights are only read).
    """
    tensors = [*diffusion_model.parameters(), *diffusion_model.buffers()]
    inference = any(t.is_inference() for t in tensors)
    widen = dtype == torch.float32 and any(t.is_floating_point() and t.dtype in (torch.float16, torch.bfloat16)
                                           for t in tensors)
    if not (inference or widen):
        return diffusion_model, False
    import copy

    with torch.inference_mode(False):
        twin = copy.deepcopy(diffusion_model)
        if widen:
            twin.to(torch.float32)
    return twin.requires_grad_(False), True


def _fixed_draws(refs: Sequence[torch.Tensor], count: int, seed: int, shift: float
                 ) -> list[tuple[int, float, torch.Tensor]]:
    """(reference index, sigma, noise) draws from their own generator, spread over the sigma range."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) ^ 0x5EED)
    draws = []
    for i in range(count):
        t = torch.tensor((i + 0.5) / count)                 # stratified t: low, middle and high noise all count
        draws.append((i % len(refs), float(shift_sigma(t, shift)), torch.randn(refs[i % len(refs)].shape, generator=g)))
    return draws


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_context_tokens(diffusion_model: torch.nn.Module, latents: Sequence[torch.Tensor], context: torch.Tensor,
                         settings: TrainSettings, device: torch.device | str,
                         weights: Sequence[torch.Tensor | None] | None = None,
                         progress: Progress | None = None,
                         check_interrupt: Callable[[], None] | None = None) -> TrainResult:
    """Optimise [num_blocks, num_tokens, context_dim] tokens so the DiT reconstructs the references.

    latents: normalised reference latents, each [1, C, T, h, w] (one per reference, any sizes).
    context: the post-adapter text context [1, N, context_dim] of the training prompt.
    weights: per reference, None or a [1, 1, T, h, w] loss weight (masked training).
    """
    if not latents:
        raise ValueError("no reference latents to train on")
    if settings.steps < 1:
        raise ValueError(f"training_steps must be at least 1, got {settings.steps}")
    device = torch.device(device)
    crosses = cross_attention_blocks(diffusion_model)
    shape = (len(crosses), settings.num_tokens, context_dim_of(crosses[0]))
    weights = list(weights) if weights is not None else [None] * len(latents)

    with torch.inference_mode(False), torch.enable_grad():
        generator = torch.Generator(device="cpu").manual_seed(int(settings.seed))
        initial = torch.randn(shape, generator=generator) * settings.init_std
        tokens = torch.nn.Parameter(initial.clone().to(device))
        # Inputs made under inference mode (VAE, text encoder) must be re-created as ordinary tensors.
        refs = [z.detach().clone().to(device=device, dtype=torch.float32) for z in latents]
        masks = [None if w is None else w.detach().clone().to(device=device, dtype=torch.float32) for w in weights]
        ctx = context.detach().clone().to(device=device, dtype=settings.dtype)
        optimizer = torch.optim.Adam([tokens], lr=settings.learning_rate)
        model, _ = training_view(diffusion_model, settings.dtype)
        was_training = model.training
        frozen = [p for p in model.parameters() if p.requires_grad]    # gradients flow to the tokens only
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        losses: list[float] = []
        draws = _fixed_draws(refs, settings.eval_draws, settings.seed, settings.shift)

        def evaluate() -> float:
            if not draws:
                return float("nan")
            total = 0.0
            with torch.no_grad():
                for i, sigma, eps in draws:
                    eps = eps.to(device)
                    x_t = (1 - sigma) * refs[i] + sigma * eps
                    timestep = torch.full((1,), sigma * settings.multiplier, device=device)
                    with _autocast(device, settings.dtype):
                        pred = model(x_t.to(settings.dtype), timestep, ctx)
                    total += float(velocity_loss(pred, eps - refs[i], masks[i]))
            return total / len(draws)

        try:
            with installed_tokens(model, tokens):
                eval_before = evaluate()
                for step in range(settings.steps):
                    if check_interrupt is not None:
                        check_interrupt()
                    i = step % len(refs)
                    x0 = refs[i]
                    eps = torch.randn(x0.shape, generator=generator).to(device)
                    sigma = shift_sigma(torch.rand((), generator=generator), settings.shift).item()
                    x_t = (1 - sigma) * x0 + sigma * eps
                    timestep = torch.full((1,), sigma * settings.multiplier, device=device)
                    with _autocast(device, settings.dtype):
                        pred = model(x_t.to(settings.dtype), timestep, ctx)
                    loss = velocity_loss(pred, eps - x0, masks[i])
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TokenOptimizationFailed(
                            f"the loss became {value} at step {step + 1} of {settings.steps} (sigma {sigma:.3f}). "
                            f"Lower the learning rate (it is {settings.learning_rate:g}; try "
                            f"{settings.learning_rate / 10:g}) or train in bf16/fp32 instead of fp16.")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if not bool(torch.isfinite(tokens).all()):
                        raise TokenOptimizationFailed(
                            f"the tokens became NaN/inf after step {step + 1} of {settings.steps}. Lower the "
                            f"learning rate (it is {settings.learning_rate:g}; try {settings.learning_rate / 10:g}).")
                    losses.append(value)
                    if progress is not None:
                        progress(step + 1, settings.steps, value)
                eval_after = evaluate()
        finally:
            model.train(was_training)
            for p in frozen:
                p.requires_grad_(True)
        return TrainResult(tokens=tokens.detach().float().cpu().clone(), initial_tokens=initial, losses=tuple(losses),
                           eval_before=eval_before, eval_after=eval_after)
