"""Anima context tokens: train per-block reference tokens from 1-3 images, inject them at sampling time.

The nodes only validate, convert and report; the DiT, the injection op and the trainer live in
models/anima/. Everything works on ComfyUI's own MODEL / CLIP / VAE objects and on the pack's
standalone stand-ins alike, because both expose the same methods.
"""

from __future__ import annotations

import math
import os

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
from ..models.anima import references as refs
from ..models.anima.context_tokens import (
    InjectionGate,
    ReferenceContext,
    reference_object_patches,
)
from ..models.anima.errors import (
    IncompatibleModelArchitecture,
    TokenOptimizationFailed,
)
from ..models.anima.reference_training import TrainingHost, diffusion_model_of, train_reference_context
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


TRAINING_HOST = TrainingHost(progress_bar=ProgressBar, check_interrupt=check_interrupt,
                             load_model_fully=load_model_fully, offload_model_weights=offload_model_weights,
                             soft_empty_cache=soft_empty_cache)


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
    def INPUT_TYPES(cls) -> dict:
        return _training_inputs(masked=False)

    def train(self, model, clip, vae, reference_image, training_prompt, seed, training_steps, learning_rate,
              training_image_size, num_tokens, init_std, training_dtype, reference_image_2=None,
              reference_image_3=None) -> tuple:
        images = [(n, im) for n, im in (("reference_image", reference_image), ("reference_image_2", reference_image_2),
                                        ("reference_image_3", reference_image_3)) if im is not None]
        ctx, info = train_reference_context(model, clip, vae, images, None, training_prompt, seed, training_steps,
                                            learning_rate, training_image_size, num_tokens, init_std, training_dtype,
                                            TRAINING_HOST)
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
    def INPUT_TYPES(cls) -> dict:
        return _training_inputs(masked=True)

    def train(self, model, clip, vae, reference_image, training_mask, training_prompt, seed, training_steps,
              learning_rate, training_image_size, num_tokens, init_std, training_dtype, reference_image_2=None,
              reference_image_3=None, training_mask_2=None, training_mask_3=None) -> tuple:
        pairs = [("reference_image", reference_image, "training_mask", training_mask),
                 ("reference_image_2", reference_image_2, "training_mask_2", training_mask_2),
                 ("reference_image_3", reference_image_3, "training_mask_3", training_mask_3)]
        images = [(n, im) for n, im, _, _ in pairs if im is not None]
        masks = [(mn, m) for _, im, mn, m in pairs if im is not None]
        ctx, info = train_reference_context(model, clip, vae, images, masks, training_prompt, seed, training_steps,
                                            learning_rate, training_image_size, num_tokens, init_std, training_dtype,
                                            TRAINING_HOST)
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
    def INPUT_TYPES(cls) -> dict:
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
              positive_only=False) -> tuple:
        if not isinstance(context, ReferenceContext):
            raise IncompatibleModelArchitecture(
                f"the context input is a {type(context).__name__}, not an ANIMA_REFERENCE_CONTEXT.")
        diffusion_model_of(model)
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
    def INPUT_TYPES(cls) -> dict:
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

    def save(self, context, filename_prefix) -> dict:
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
    def INPUT_TYPES(cls) -> dict:
        files = host_paths.list_model_files([input_dir()], (".safetensors",)) or \
            ["(copy saved contexts into the input folder)"]
        return {"required": {"context_file": (files, {
            "tooltip": "A .safetensors reference context in the input folder."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, context_file):
        if not os.path.isfile(os.path.join(input_dir(), context_file)):
            return f"Reference context file not found in the input folder: {context_file}"
        return True

    def load(self, context_file) -> tuple:
        path = os.path.join(input_dir(), context_file)
        meta = read_metadata(path)
        ctx = refs.context_from_file_dict(load_state_dict(path), meta, path)
        info = (f"{context_file}: {ctx.num_blocks} blocks × {ctx.num_tokens} tokens × {ctx.context_dim}; "
                f"{ctx.steps} steps at lr {ctx.learning_rate:g}; final loss {ctx.final_loss:.4f}; "
                f"{ctx.reference_count} reference(s); prompt {ctx.training_prompt!r}")
        return (ctx, info)
