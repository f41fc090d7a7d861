"""Training Anima context tokens from reference images, on whatever MODEL / CLIP / VAE the graph gives.

The two trainer nodes (plain and masked) share this body: split and fit the images, encode the
prompt and the references (text encoder and VAE first, because loading them may push the DiT out
of VRAM), load the DiT, train the tokens on a private low-precision view when one is needed, and
report. It lives here, not in the node module, so the nodes stay thin; the host's progress bar,
interrupt check and memory moves arrive as a `TrainingHost` because models/ cannot import host/.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...kernels.precision import resolve_dtype
from . import references as refs
from .context_tokens import ReferenceContext, cross_attention_blocks, token_norm_summary
from .errors import IncompatibleModelArchitecture, InvalidTrainingSetting, TokenOptimizationFailed
from .llm_adapter import pad_context
from .train import TrainSettings, train_context_tokens, training_view


@dataclass(frozen=True)
class TrainingHost:
    """What training needs from the host: a progress bar, interrupts, and moving the DiT's weights."""

    progress_bar: Callable[[int], object]      # total -> bar with update_absolute(value) and close()
    check_interrupt: Callable[[], None]
    load_model_fully: Callable[[object], None]        # MODEL -> all weights on its load device
    offload_model_weights: Callable[[object], object]  # MODEL -> weights off the compute device
    soft_empty_cache: Callable[[], None]


def diffusion_model_of(model) -> torch.nn.Module:
    try:
        dm = model.get_model_object("diffusion_model")
    except AttributeError as exc:
        raise IncompatibleModelArchitecture(
            f"the MODEL input is a {type(model).__name__} without a diffusion model ({exc}). "
            "Connect the MODEL output of an Anima model loader.") from exc
    cross_attention_blocks(dm)
    wrapper = getattr(model, "model", None)
    missing = [name for name in ("process_latent_in", "model_sampling") if not hasattr(wrapper, name)]
    if missing:
        raise IncompatibleModelArchitecture(
            f"the MODEL input ({type(wrapper).__name__}) holds an Anima DiT without Anima's latent format and "
            f"sampling (no {' or '.join(missing)}), as the standalone INT8 loader gives it. Load the model with "
            "'Load Anima Model' to train or patch context tokens.")
    return dm


def _check_settings(training_steps: int, learning_rate: float, training_image_size: int, num_tokens: int,
                    init_std: float) -> None:
    """Refuse settings no training can use, before any encoding or training time is spent."""
    if not _at_least(training_steps, 1):
        raise InvalidTrainingSetting(f"training_steps is {training_steps}; give at least 1 step.")
    if not (_at_least(learning_rate, 0) and learning_rate > 0):
        raise InvalidTrainingSetting(f"learning_rate is {learning_rate}; give a positive finite rate such as 0.005.")
    if not _at_least(num_tokens, 1):
        raise InvalidTrainingSetting(f"num_tokens is {num_tokens}; give at least 1 token per block (4-16 is typical).")
    if not _at_least(init_std, 0):
        raise InvalidTrainingSetting(f"init_std is {init_std}; give a finite value of 0 or more (0.02 is typical).")
    if not _at_least(training_image_size, refs.PATCH_PIXELS):
        raise InvalidTrainingSetting(f"training_image_size is {training_image_size}; give at least "
                                     f"{refs.PATCH_PIXELS} pixels (512 is typical).")


def _at_least(value: object, minimum: float) -> bool:
    """A finite real number >= minimum (NaN, inf, None and strings are not)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and value >= minimum)


def _encode_prompt(clip, prompt: str) -> dict:
    """CLIP output of the training prompt: Qwen3 states plus the T5 ids (and weights) Anima's adapter needs."""
    out = clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)
    if out.get("t5xxl_ids") is None:
        raise IncompatibleModelArchitecture(
            f"the CLIP input ({type(clip).__name__}) is not Anima's text encoder: its output has no T5 token ids. "
            "Load qwen_3_06b_base with the Anima text-encoder loader (or CLIPLoader type 'anima').")
    return out


def _text_context(dm: torch.nn.Module, encoded: dict, device: torch.device) -> torch.Tensor:
    """The DiT's context [1, >=512, C]: Qwen3 states -> LLM adapter -> prompt weights -> zero-padding."""
    if not hasattr(dm, "preprocess_text_embeds"):
        raise IncompatibleModelArchitecture(
            f"the MODEL's diffusion model is a {type(dm).__name__} without Anima's LLM adapter "
            "(no preprocess_text_embeds). These nodes need Anima, not plain Cosmos-Predict2.")
    weights = encoded.get("t5xxl_weights")
    with torch.inference_mode(False), torch.no_grad():   # this order: no_grad must win
        cond = encoded["cond"].detach().clone().to(device)
        ids = encoded["t5xxl_ids"].detach().clone().to(device)[None]
        weights = None if weights is None else weights.detach().clone().to(device=device, dtype=cond.dtype)[None, :, None]
        try:
            ctx = dm.preprocess_text_embeds(cond, ids, t5xxl_weights=weights)
        except TypeError:          # ComfyUI of January 2026: no weights argument, no padding inside
            ctx = dm.preprocess_text_embeds(cond, ids)
            ctx = pad_context(ctx * weights if weights is not None else ctx)
    return ctx.detach().float()


def _latent_channels(dm: torch.nn.Module) -> int | None:
    channels = getattr(dm, "in_channels", None)
    if channels is None and hasattr(dm, "config"):
        channels = getattr(dm.config, "in_channels", None)
    return channels


def _encode_reference(dm, vae, image: torch.Tensor, name: str) -> torch.Tensor:
    """One fitted image [1, h, w, 3] -> raw latent [1, C, 1, h/8, w/8], encoded alone."""
    latent = vae.encode(image)
    if latent.ndim == 4:
        latent = latent[:, :, None]
    want = _latent_channels(dm)
    if latent.ndim != 5 or (want is not None and latent.shape[1] != want):
        raise IncompatibleModelArchitecture(
            f"the VAE turned {name} into a latent of shape {tuple(latent.shape)}, but Anima needs {want}-channel "
            "Wan 2.1 latents. Use Anima's VAE (qwen_image_vae.safetensors / Wan 2.1 VAE).")
    return latent[:, :, :1]


def _info(ctx: ReferenceContext, initial: torch.Tensor, settings: TrainSettings, device, seconds: float,
          first: float, last: float, eval_before: float) -> str:
    window = max(1, len(ctx.loss_history) // 10)
    sizes = ", ".join(f"{w}×{h}" for h, w in ctx.image_sizes)
    return "\n".join([
        f"Anima context tokens: {ctx.steps} steps, learning rate {ctx.learning_rate:g}, seed {settings.seed}",
        f"tokens: {ctx.num_blocks} blocks × {ctx.num_tokens} × {ctx.context_dim} "
        f"({ctx.tokens.numel():,} values), trained in {str(settings.dtype).removeprefix('torch.')} on {device}",
        f"references: {ctx.reference_count} ({sizes})",
        f"token norm before: {token_norm_summary(initial)}",
        f"token norm after:  {token_norm_summary(ctx.tokens)}",
        f"loss first/last (mean of {window} step{'s' if window > 1 else ''}): {first:.4f} -> {last:.4f}",
        f"loss on {settings.eval_draws} fixed noise draws, before/after: {eval_before:.4f} -> {ctx.final_loss:.4f}",
        f"time: {seconds:.1f} s ({1000 * seconds / max(ctx.steps, 1):.0f} ms/step)",
    ])


def train_reference_context(model, clip, vae, images: list[tuple[str, torch.Tensor]],
                            masks: list[tuple[str, torch.Tensor | None]] | None, training_prompt: str, seed: int,
                            training_steps: int, learning_rate: float, training_image_size: int, num_tokens: int,
                            init_std: float, training_dtype: str, host: TrainingHost) -> tuple[ReferenceContext, str]:
    """Images (and masks) -> ReferenceContext + a report: what both trainer nodes run.

    `model`, `clip`, `vae` are ComfyUI's MODEL / CLIP / VAE values or the pack's stand-ins (both have
    the methods used here); `host` gives the progress bar, interrupts and memory moves of the host."""
    started = time.perf_counter()
    _check_settings(training_steps, learning_rate, training_image_size, num_tokens, init_std)
    pictures: list[tuple[str, torch.Tensor]] = []
    for name, batch in images:
        parts = refs.split_images(batch, name)
        pictures += [(f"{name}[{i}]" if len(parts) > 1 else name, img) for i, img in enumerate(parts)]
    pixel_masks: list[tuple[str, torch.Tensor] | None] = [None] * len(pictures)
    if masks is not None:
        pixel_masks = []
        for (_, batch), (mask_name, mask) in zip(images, masks, strict=True):
            count = batch.shape[0]
            if mask is None:
                pixel_masks += [None] * count
                continue
            parts = refs.split_masks(mask, mask_name, count)
            pixel_masks += [(f"{mask_name}[{i}]" if count > 1 else mask_name, m) for i, m in enumerate(parts)]
    dm = diffusion_model_of(model)
    # Text encoder and VAE first: loading them may push the DiT out of VRAM, so it is loaded last.
    encoded = _encode_prompt(clip, training_prompt)
    raw_latents, weights, sizes = [], [], []
    for (name, img), pmask in zip(pictures, pixel_masks, strict=True):
        fitted = refs.fit_image(img, training_image_size)
        sizes.append((fitted.shape[1], fitted.shape[2]))
        latent = _encode_reference(dm, vae, fitted, name)
        raw_latents.append(latent)
        if pmask is None:
            weights.append(None)
        else:
            mask_name, mask = pmask
            fmask = refs.fit_mask(mask, tuple(img.shape[:2]), training_image_size, mask_name)
            weights.append(refs.latent_weight(fmask, tuple(latent.shape[-2:]), mask_name))
        host.check_interrupt()

    host.load_model_fully(model)
    device = torch.device(model.load_device)
    dtype = resolve_dtype(training_dtype, device)
    context = _text_context(dm, encoded, device)
    latents = [model.model.process_latent_in(z) for z in raw_latents]
    trainee, copied = training_view(dm, dtype)
    if copied:            # training reads only the private copy: give the original's memory back meanwhile
        host.offload_model_weights(model)

    sampling = model.get_model_object("model_sampling")
    settings = TrainSettings(steps=int(training_steps), learning_rate=float(learning_rate), num_tokens=int(num_tokens),
                             init_std=float(init_std), seed=int(seed), dtype=dtype,
                             shift=float(getattr(sampling, "shift", 3.0)),
                             multiplier=float(getattr(sampling, "multiplier", 1.0)))
    bar = host.progress_bar(settings.steps)
    try:
        result = train_context_tokens(trainee, latents, context, settings, device, weights,
                                      progress=lambda done, total, loss: bar.update_absolute(done),
                                      check_interrupt=host.check_interrupt)
    except torch.OutOfMemoryError as exc:
        raise TokenOptimizationFailed(
            f"out of memory while training at {sizes[0][1]}×{sizes[0][0]} px ({exc}). Lower training_image_size "
            "or use bf16.") from exc
    finally:
        bar.close()
        del trainee
        host.soft_empty_cache()
    first, last = result.window_mean(True), result.window_mean(False)
    ctx = ReferenceContext(tokens=result.tokens, steps=settings.steps, learning_rate=settings.learning_rate,
                           final_loss=result.eval_after, reference_count=len(latents), training_prompt=training_prompt,
                           image_sizes=tuple(sizes), loss_history=result.losses)
    info = _info(ctx, result.initial_tokens, settings, device, time.perf_counter() - started, first, last,
                 result.eval_before)
    return ctx, info
