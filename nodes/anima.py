"""Anima context tokens: train per-block reference tokens from 1-3 images, inject them at sampling time.

The nodes only validate, convert and report; the DiT, the injection op and the trainer live in
models/anima/. Everything works on ComfyUI's own MODEL / CLIP / VAE objects and on the pack's
standalone stand-ins alike, because both expose the same methods.
"""

from __future__ import annotations

import math
import numbers
import os
import time

import torch

from ..host import (
    ProgressBar,
    check_interrupt,
    input_dir,
    load_model_fully,
    offload_model_weights,
    prefix_problem,
    publish,
    save_target,
    soft_empty_cache,
    staged_file,
    ui_file,
)
from ..host import paths as host_paths
from ..kernels.precision import resolve_dtype
from ..models.anima import references as refs
from ..models.anima.context_tokens import (
    InjectionGate,
    ReferenceContext,
    cross_attention_blocks,
    reference_object_patches,
    token_norm_summary,
)
from ..models.anima.errors import (
    IncompatibleModelArchitecture,
    InvalidTrainingSetting,
    TokenOptimizationFailed,
)
from ..models.anima.llm_adapter import pad_context
from ..models.anima.train import TrainSettings, train_context_tokens, training_view
from ..models.checkpoint import load_state_dict, read_metadata

CATEGORY = "Slipstream/Anima"
CONTEXT_TYPE = "ANIMA_REFERENCE_CONTEXT"
DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]


# -- shared pieces --------------------------------------------------------------------------------

def _training_inputs(masked: bool) -> dict:
    required = {
        "model": ("MODEL", {"tooltip": "The Anima diffusion model (DiT with its LLM adapter). Its weights are only "
                                       "read: training never changes them."}),
        "clip": ("CLIP", {"tooltip": "Anima's text encoder (Qwen3-0.6B + T5 token ids), used to encode the "
                                     "training prompt once."}),
        "vae": ("VAE", {"tooltip": "Anima's VAE (the Qwen-Image / Wan 2.1 VAE). Each reference image is encoded on "
                                   "its own, so a batch is never mistaken for video frames."}),
        "reference_image": ("IMAGE", {"tooltip": "The reference (e.g. a character). A batch of several images "
                                                 "counts as several references."}),
    }
    if masked:
        required["training_mask"] = ("MASK", {
            "tooltip": "Where the loss counts on reference_image: white (1) = learn this region, black (0) = ignore "
                       "it. Same size as the image (or the same aspect ratio); grey values weight partially. One "
                       "mask for the whole batch, or one per image."})
    required.update({
        "training_prompt": ("STRING", {"multiline": True, "default": "a character",
                                       "tooltip": "A short caption of the references. The tokens learn what this "
                                                  "prompt does not already say, so keep it generic (\"a girl\", "
                                                  "\"a character\")."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "tooltip": "Seeds token initialisation, noise and sigma draws: the same seed and inputs "
                                    "give the same tokens."}),
        "training_steps": ("INT", {"default": 200, "min": 1, "max": 5000,
                                   "tooltip": "Optimisation steps (one reference image per step, cycling). 100-300 "
                                              "is typical; each step is one forward and backward pass of the DiT."}),
        "learning_rate": ("FLOAT", {"default": 0.005, "min": 0.00001, "max": 0.1, "step": 0.0001,
                                    "tooltip": "Adam learning rate for the tokens. Lower it if training reports "
                                               "'Token optimization failed'."}),
        "training_image_size": ("INT", {"default": 512, "min": 64, "max": 1536, "step": 16,
                                        "tooltip": "Each reference is scaled to about this many pixels squared, "
                                                   "keeping its aspect ratio (sides multiples of 16). 512 is fast; "
                                                   "768-1024 keeps more detail and needs more memory."}),
        "num_tokens": ("INT", {"default": 8, "min": 1, "max": 64,
                               "tooltip": "Tokens per DiT block appended to the text context (28 blocks × N × "
                                          "1024 values). 4-16 is typical."}),
        "init_std": ("FLOAT", {"default": 0.02, "min": 0.0, "max": 1.0, "step": 0.001,
                               "tooltip": "Standard deviation of the tokens' random start (0 = start from zeros)."}),
        "training_dtype": (DTYPE_CHOICES, {"default": "auto",
                                           "tooltip": "Precision of the DiT's forward/backward passes (tokens and "
                                                      "Adam stay fp32). auto: bf16 on recent GPUs, fp16 on older "
                                                      "ones, fp32 on CPU. fp32 on a bf16 checkpoint needs a "
                                                      "temporary fp32 copy of the DiT."}),
    })
    optional = {
        "reference_image_2": ("IMAGE", {"tooltip": "Optional second reference (another view or outfit)."}),
        "reference_image_3": ("IMAGE", {"tooltip": "Optional third reference."}),
    }
    if masked:
        optional["training_mask_2"] = ("MASK", {"tooltip": "Mask for reference_image_2 (default: the whole image)."})
        optional["training_mask_3"] = ("MASK", {"tooltip": "Mask for reference_image_3 (default: the whole image)."})
    return {"required": required, "optional": optional}


def _diffusion_model(model) -> torch.nn.Module:
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


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = resolve_dtype(name, device)
    return dtype


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
                            init_std: float, training_dtype: str) -> tuple[ReferenceContext, str]:
    """The shared body of both trainer nodes: images (and masks) -> ReferenceContext + info."""
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
    dm = _diffusion_model(model)
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
        check_interrupt()

    load_model_fully(model)
    device = torch.device(model.load_device)
    dtype = _compute_dtype(training_dtype, device)
    context = _text_context(dm, encoded, device)
    latents = [model.model.process_latent_in(z) for z in raw_latents]
    trainee, copied = training_view(dm, dtype)
    if copied:            # training reads only the private copy: give the original's memory back meanwhile
        offload_model_weights(model)

    sampling = model.get_model_object("model_sampling")
    settings = TrainSettings(steps=int(training_steps), learning_rate=float(learning_rate), num_tokens=int(num_tokens),
                             init_std=float(init_std), seed=int(seed), dtype=dtype,
                             shift=float(getattr(sampling, "shift", 3.0)),
                             multiplier=float(getattr(sampling, "multiplier", 1.0)))
    bar = ProgressBar(settings.steps)
    try:
        result = train_context_tokens(trainee, latents, context, settings, device, weights,
                                      progress=lambda done, total, loss: bar.update_absolute(done),
                                      check_interrupt=check_interrupt)
    except torch.OutOfMemoryError as exc:
        raise TokenOptimizationFailed(
            f"out of memory while training at {sizes[0][1]}×{sizes[0][0]} px ({exc}). Lower training_image_size "
            "or use bf16.") from exc
    finally:
        bar.close()
        del trainee
        soft_empty_cache()
    first, last = result.window_mean(True), result.window_mean(False)
    ctx = ReferenceContext(tokens=result.tokens, steps=settings.steps, learning_rate=settings.learning_rate,
                           final_loss=result.eval_after, reference_count=len(latents), training_prompt=training_prompt,
                           image_sizes=tuple(sizes), loss_history=result.losses)
    info = _info(ctx, result.initial_tokens, settings, device, time.perf_counter() - started, first, last,
                 result.eval_before)
    return ctx, info


# -- nodes ----------------------------------------------------------------------------------------

class AnimaFastTrainReferenceContext:
    DESCRIPTION = ("Trains per-block context tokens (XTI-style textual inversion) from 1-3 reference images on a frozen "
                   "Anima model, in memory, in minutes. Connect the result to 'AnimaFastTrain - Patch Model' to "
                   "inject the tokens into every block's cross-attention while sampling.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (CONTEXT_TYPE, "STRING")
    RETURN_NAMES = ("context", "info")
    OUTPUT_TOOLTIPS = ("The trained tokens [blocks, tokens, 1024] with their training metadata (steps, learning "
                       "rate, final loss, reference count). In memory only; save it with 'Save Anima Reference "
                       "Context' to reuse it later.",
                       "A summary: steps, learning rate, token norms before and after, loss first/last, time.")

    @classmethod
    def INPUT_TYPES(cls):
        return _training_inputs(masked=False)

    def train(self, model, clip, vae, reference_image, training_prompt, seed, training_steps, learning_rate,
              training_image_size, num_tokens, init_std, training_dtype, reference_image_2=None,
              reference_image_3=None):
        images = [(n, im) for n, im in (("reference_image", reference_image), ("reference_image_2", reference_image_2),
                                        ("reference_image_3", reference_image_3)) if im is not None]
        ctx, info = train_reference_context(model, clip, vae, images, None, training_prompt, seed, training_steps,
                                            learning_rate, training_image_size, num_tokens, init_std, training_dtype)
        return (ctx, info)


class AnimaFastTrainMaskedReferenceContext:
    DESCRIPTION = ("Like 'Train Context Tokens', but a mask per reference says where the loss counts: the tokens "
                   "learn the character, not the background or pose you mask out.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (CONTEXT_TYPE, "STRING")
    RETURN_NAMES = ("context", "info")
    OUTPUT_TOOLTIPS = AnimaFastTrainReferenceContext.OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        return _training_inputs(masked=True)

    def train(self, model, clip, vae, reference_image, training_mask, training_prompt, seed, training_steps,
              learning_rate, training_image_size, num_tokens, init_std, training_dtype, reference_image_2=None,
              reference_image_3=None, training_mask_2=None, training_mask_3=None):
        pairs = [("reference_image", reference_image, "training_mask", training_mask),
                 ("reference_image_2", reference_image_2, "training_mask_2", training_mask_2),
                 ("reference_image_3", reference_image_3, "training_mask_3", training_mask_3)]
        images = [(n, im) for n, im, _, _ in pairs if im is not None]
        masks = [(mn, m) for _, im, mn, m in pairs if im is not None]
        ctx, info = train_reference_context(model, clip, vae, images, masks, training_prompt, seed, training_steps,
                                            learning_rate, training_image_size, num_tokens, init_std, training_dtype)
        return (ctx, info)


class AnimaFastTrainPatchModel:
    DESCRIPTION = ("Returns a copy of the MODEL whose cross-attention also attends to the trained reference tokens "
                   "(per block, after the text). The input MODEL is untouched; remove the node to undo. Optional: "
                   "limit it to part of the sampling (start/end percent) or to the positive prompt.")
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched clone of the input MODEL; connect it to your sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The Anima model the context was trained on (or a LoRA'd version)."}),
                "context": (CONTEXT_TYPE, {"tooltip": "Reference context from 'Train Context Tokens' (or loaded "
                                                      "from a file)."}),
                "reference_context_scale": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                    "tooltip": "How strongly the tokens pull: their attention weight is multiplied by this (a "
                               "logit bias of log(scale)), so 1 = as trained, 2 = twice the pull, 0.5 = half, "
                               "0 = off (identical to the unpatched model)."}),
            },
            "optional": {
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Start injecting at this point of sampling (0 = first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Stop injecting after this point (1 = last step). Early steps "
                                                     "set composition and identity; late ones details."}),
                "positive_only": ("BOOLEAN", {"default": False,
                                              "tooltip": "Inject only into the positive (cond) pass. CFG then "
                                                         "amplifies the reference; off = both passes, like a "
                                                         "prompt shared by positive and negative."}),
            },
        }

    def patch(self, model, context, reference_context_scale, start_percent=0.0, end_percent=1.0,
              positive_only=False):
        if not isinstance(context, ReferenceContext):
            raise IncompatibleModelArchitecture(
                f"the context input is a {type(context).__name__}, not an ANIMA_REFERENCE_CONTEXT.")
        _diffusion_model(model)
        patched = model.clone()
        if reference_context_scale <= 0 or end_percent <= start_percent:
            return (patched,)
        sampling = model.get_model_object("model_sampling")
        gate = InjectionGate(
            sigma_start=float(sampling.percent_to_sigma(start_percent)) if start_percent > 0 else math.inf,
            sigma_end=float(sampling.percent_to_sigma(end_percent)) if end_percent < 1 else 0.0,
            positive_only=bool(positive_only))
        patches = reference_object_patches(model.get_model_object, context.tokens, float(reference_context_scale), gate)
        for name, op in patches.items():
            patched.add_object_patch(name, op)
        return (patched,)


class SlipstreamAnimaSaveReferenceContext:
    DESCRIPTION = ("Saves a trained Anima reference context (tokens + metadata) as a small safetensors file, so it "
                   "can be reused without training again. Never overwrites: files are numbered.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    OUTPUT_TOOLTIPS = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "context": (CONTEXT_TYPE, {"tooltip": "The reference context to save."}),
            "filename_prefix": ("STRING", {"default": "anima_context/reference",
                                           "tooltip": "Path under the output folder; subfolders and %date:…% "
                                                      "patterns work. A number is appended."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):  # noqa: N802 (ComfyUI's name)
        """Refuse a prefix no file can be saved under when the prompt is queued, before any training runs."""
        return prefix_problem(filename_prefix)

    def save(self, context, filename_prefix):
        from safetensors.torch import save_file

        if not isinstance(context, ReferenceContext):
            raise IncompatibleModelArchitecture(
                f"the context input is a {type(context).__name__}, not an ANIMA_REFERENCE_CONTEXT.")
        tensors, meta = refs.context_to_file_dict(context)
        broken = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
        if broken:
            raise TokenOptimizationFailed(f"the context's {' and '.join(broken)} hold NaN or inf values, so nothing "
                                          "was saved. Train it again with a lower learning rate.")
        target = save_target(filename_prefix)
        with staged_file(target, "safetensors") as tmp:
            save_file(tensors, tmp, metadata=meta)
            path = publish(tmp, target, "safetensors")
        return {"ui": {"text": [f"saved {path}"], "files": [ui_file(path, target)]}}


class SlipstreamAnimaLoadReferenceContext:
    DESCRIPTION = ("Loads a reference context saved by 'Save Anima Reference Context'. Like core Load Latent, it "
                   "reads from the input folder: copy the file there from output/anima_context.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (CONTEXT_TYPE, "STRING")
    RETURN_NAMES = ("context", "info")
    OUTPUT_TOOLTIPS = ("The stored tokens and metadata, ready for 'AnimaFastTrain - Patch Model'.",
                       "What the file holds: tokens shape, steps, learning rate, loss, references, prompt.")

    @classmethod
    def INPUT_TYPES(cls):
        files = host_paths.list_model_files([input_dir()], (".safetensors",)) or \
            ["(copy saved contexts into the input folder)"]
        return {"required": {"context_file": (files, {
            "tooltip": "A .safetensors reference context in the input folder."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, context_file):
        if not os.path.isfile(os.path.join(input_dir(), context_file)):
            return f"Reference context file not found in the input folder: {context_file}"
        return True

    def load(self, context_file):
        path = os.path.join(input_dir(), context_file)
        meta = read_metadata(path)
        ctx = refs.context_from_file_dict(load_state_dict(path), meta, path)
        info = (f"{context_file}: {ctx.num_blocks} blocks × {ctx.num_tokens} tokens × {ctx.context_dim}; "
                f"{ctx.steps} steps at lr {ctx.learning_rate:g}; final loss {ctx.final_loss:.4f}; "
                f"{ctx.reference_count} reference(s); prompt {ctx.training_prompt!r}")
        return (ctx, info)
