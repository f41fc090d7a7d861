"""Wan Cache Calibrate: fits the step caches' tables (TeaCache polynomial, MagCache ratio curve) on one
uncached run of the connected model and hands them on in the cache args.

The run is the Wan Sampler's own (nodes/wan.py: progress bar, interrupt checks, VRAM handling) with the
cache left out and CFG batched, so each batch row is one branch for the recorder's hooks
(models/wan/cache_calibration.py); its latent is thrown away.
"""

from __future__ import annotations

from dataclasses import replace

from ..models.wan.cache_calibration import CacheRecorder, fit_teacache, mag_ratio_curve
from ..models.wan.pipeline import WanImageEmbeds, WanModelHandle, WanTextEmbeds
from ..models.wan.sampling import SCHEDULERS
from ..models.wan.step_cache import CacheArgs
from .wan import CATEGORY, WanSampler

_SAMPLER_INPUTS = WanSampler.INPUT_TYPES()["required"]


class WanCacheCalibrate:
    DESCRIPTION = ("Calibrates the step cache on this model: runs one uncached sampling run (the Wan "
                   "Sampler's, with progress and cancel) and fits the TeaCache polynomial and the MagCache "
                   "ratio curve to how this model's outputs actually move, instead of the tables published "
                   "for the released Wan 2.1 weights. Use it for fine-tunes, distilled or merged models; "
                   "connect its cache_args to the Wan Sampler. Costs one full run without caching.")
    CATEGORY = CATEGORY
    FUNCTION = "calibrate"
    RETURN_TYPES = ("SLIP_WAN_CACHE_ARGS",)
    RETURN_NAMES = ("cache_args",)
    OUTPUT_TOOLTIPS = ("The input cache settings carrying this model's TeaCache coefficients and MagCache "
                       "ratios, for the Wan Sampler's cache_args input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("SLIP_WAN_MODEL", {"tooltip": "From the Wan Model Loader: the model to calibrate (the one "
                                                    "the Wan Sampler will run)."}),
            "image_embeds": ("SLIP_WAN_IMAGE_EMBEDS", {"tooltip": "Size and frames (Wan Empty Embeds) or I2V "
                                                                  "conditioning; a smaller size calibrates faster "
                                                                  "and usually close enough."}),
            "text_embeds": ("SLIP_WAN_TEXT_EMBEDS", {"tooltip": "From Wan Text Encode: a typical prompt (and "
                                                                "negative prompt) for the model."}),
            "cache_args": ("SLIP_WAN_CACHE_ARGS", {"tooltip": "From Wan Cache Args: method, threshold and step "
                                                              "window, passed on with the calibration added."}),
            "steps": ("INT", {"default": 30, "min": 4, "max": 1000, "step": 1,
                              "tooltip": "Steps of the calibration run; the ratio curve is resampled to the "
                                         "sampler's step count. TeaCache needs at least 4 with cfg above 1, 6 "
                                         "at cfg 1."}),
            "cfg": _SAMPLER_INPUTS["cfg"],
            "shift": _SAMPLER_INPUTS["shift"],
            "seed": _SAMPLER_INPUTS["seed"],
            "scheduler": (list(SCHEDULERS), {"default": "unipc",
                                             "tooltip": "Solver and schedule of the calibration run: best the "
                                                        "one the Wan Sampler uses."}),
        }}

    def calibrate(self, model: WanModelHandle, image_embeds: WanImageEmbeds, text_embeds: WanTextEmbeds,
                  cache_args: CacheArgs, steps: int, cfg: float, shift: float, seed: int,
                  scheduler: str) -> tuple[CacheArgs]:
        if not isinstance(cache_args, CacheArgs):
            raise ValueError("Wan Cache Calibrate: 'cache_args' is not a Wan Cache Args output; connect a Wan "
                             "Cache Args node.")
        with CacheRecorder(model.dit) as recorder:
            # batched_cfg on: row 0 of each forward is the positive branch, row 1 the negative one.
            WanSampler().sample(model, image_embeds, text_embeds, steps, cfg, shift, seed, scheduler, 1.0,
                                force_offload=False, batched_cfg="on")
        try:
            coefficients = fit_teacache(recorder.traces)
        except ValueError as err:
            raise ValueError(f"Wan Cache Calibrate: {err}") from None
        return (replace(cache_args, coefficients=coefficients, mag_ratios=mag_ratio_curve(recorder.traces)),)
