"""Option nodes for the Wan Sampler: context windows, Enhance-A-Video (FETA), step caches, Skip Layer
Guidance, the guidance extras (CFG-Zero*, per-step cfg, RIFLEx) and Normalized Attention Guidance.

Each node only turns its widgets into the frozen settings dataclass models/wan defines; the sampler
(nodes/wan.py) hands them to the pipeline. They live apart from the loader and the sampler so each
module stays one job.
"""

from __future__ import annotations

from ..models.wan.context import FUSE_METHODS, SCHEDULES, ContextOptions
from ..models.wan.feta import FetaArgs
from ..models.wan.guidance import GuidanceArgs, SLGArgs, parse_cfg_list
from ..models.wan.guidance import parse_blocks as parse_slg_blocks
from ..models.wan.nag import NagArgs
from ..models.wan.step_cache import DEFAULT_THRESHOLDS as CACHE_DEFAULTS
from ..models.wan.step_cache import METHODS as CACHE_METHODS
from ..models.wan.step_cache import CacheArgs
from .wan import CATEGORY


class WanEnhanceVideo:
    DESCRIPTION = ("Enhance-A-Video (FETA): strengthens how much frames attend to each other, for smoother, "
                   "more consistent motion at no speed cost. Weight 0 disables it. Lower the weight (or end "
                   "it early) for short clips.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("SLIP_WAN_FETA_ARGS",)
    RETURN_NAMES = ("feta_args",)
    OUTPUT_TOOLTIPS = ("Enhance-A-Video settings for the Wan Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "weight": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                 "tooltip": "Enhancement temperature; 0 = off. 2 suits ~81 frames."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "First step (as a fraction of all steps) it applies to."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Last step (as a fraction of all steps) it applies to."}),
        }}

    def make(self, weight, start_percent, end_percent) -> tuple:
        return (FetaArgs(weight, start_percent, end_percent),)


class WanContextOptions:
    DESCRIPTION = ("Context windows: generate videos longer than the model's window by denoising overlapping "
                   "windows and blending them every step. Numbers are pixel frames (4 pixel frames = 1 latent "
                   "frame). Cost grows with the number of windows.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("SLIP_WAN_CONTEXT",)
    RETURN_NAMES = ("context_options",)
    OUTPUT_TOOLTIPS = ("Context-window settings for the Wan Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "context_schedule": (list(SCHEDULES), {"default": SCHEDULES[0],
                                                   "tooltip": "uniform_standard: windows shift every step (seams "
                                                              "move, fewer artefacts). uniform_looped: windows wrap "
                                                              "around (for loops). static_standard: fixed windows."}),
            "context_frames": ("INT", {"default": 81, "min": 5, "max": 1001, "step": 4,
                                       "tooltip": "Window length in pixel frames (81 = the model's native 5 s)."}),
            "context_stride": ("INT", {"default": 4, "min": 4, "max": 100, "step": 4,
                                       "tooltip": "uniform schedules: above 4 adds dilated windows (every 2nd, 4th "
                                                  "… frame) for long-range coherence, at extra cost."}),
            "context_overlap": ("INT", {"default": 16, "min": 4, "max": 100, "step": 4,
                                        "tooltip": "Pixel frames shared by neighbouring windows and blended."}),
            "freenoise": ("BOOLEAN", {"default": True,
                                      "tooltip": "Start later windows from shuffled copies of earlier noise, so "
                                                 "windows agree more."}),
            "fuse_method": (list(FUSE_METHODS), {"default": "linear",
                                                 "tooltip": "How overlaps blend: linear ramps across the overlap, "
                                                            "or a pyramid over the whole window."}),
        }}

    def make(self, context_schedule, context_frames, context_stride, context_overlap, freenoise, fuse_method) -> tuple:
        return (ContextOptions(context_schedule, context_frames, context_stride, context_overlap, freenoise,
                               fuse_method),)


class WanCacheArgs:
    DESCRIPTION = ("Step cache for the Wan Sampler: skips whole model forwards when the predicted change since "
                   "the last computed step is small, reusing that step's result (per CFG branch and context "
                   "window). teacache: time-embedding change through the published Wan polynomial; magcache: "
                   "calibrated residual magnitude ratios; easycache: change of the model input, as ComfyUI "
                   "core's EasyCache (one decision per step for all CFG branches). The sampler logs how many "
                   "forwards were skipped.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("SLIP_WAN_CACHE_ARGS",)
    RETURN_NAMES = ("cache_args",)
    OUTPUT_TOOLTIPS = ("Step cache settings for the Wan Sampler's cache_args input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "method": (list(CACHE_METHODS), {"default": "teacache",
                                             "tooltip": "teacache, magcache or easycache (see the help page)."}),
            "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                    "tooltip": "How much predicted change may pile up before a forward runs again. "
                                               "Higher = faster, less faithful. 0 = the method's default: "
                                               "teacache 0.3, magcache 0.12, easycache 0.2 (core EasyCache's "
                                               "default and formula)."}),
            "start_step": ("INT", {"default": 1, "min": 0, "max": 1000,
                                   "tooltip": "First step that may be skipped (earlier steps always run). "
                                              "Core EasyCache's start_percent 0.15 is about step "
                                              "0.15 x steps."}),
            "end_step": ("INT", {"default": -1, "min": -1, "max": 1000,
                                 "tooltip": "Steps from here on always run; -1: up to the last step (which "
                                            "always runs). Core's end_percent 0.95 is about step "
                                            "0.95 x steps."}),
            "cache_device": (["main_device", "offload_device"], {"default": "main_device",
                                                                 "tooltip": "Where the cached residuals wait "
                                                                            "between steps (offload saves VRAM)."}),
        }, "optional": {
            "magcache_k": ("INT", {"default": 2, "min": 1, "max": 20,
                                   "tooltip": "magcache: most steps skipped in a row."}),
            "retention": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 0.99, "step": 0.01,
                                    "tooltip": "magcache: fraction of the first steps that always run."}),
        }}

    def make(self, method, threshold, start_step, end_step, cache_device, magcache_k=2, retention=0.2) -> tuple:
        threshold = float(threshold) or CACHE_DEFAULTS.get(method, 0.0)   # 0: the chosen method's own default
        return (CacheArgs(method, threshold, int(start_step), int(end_step), cache_device,
                          int(magcache_k), float(retention)),)


class WanSkipLayerGuidance:
    DESCRIPTION = ("Skip Layer Guidance for the Wan Sampler: in the chosen part of the schedule the negative "
                   "branch runs without the given transformer blocks, and guidance steers away from that "
                   "weakened prediction too — usually sharper motion and anatomy. Needs cfg above 1.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("SLIP_WAN_SLG_ARGS",)
    RETURN_NAMES = ("slg_args",)
    OUTPUT_TOOLTIPS = ("SLG settings for the Wan Sampler's slg_args input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "blocks": ("STRING", {"default": "9", "tooltip": "Block indices to skip, e.g. '9', '8,9' or '8-10' "
                                                              "(0-29 for 1.3B, 0-39 for 14B)."}),
            "start_percent": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Part of the schedule where SLG starts."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Part of the schedule where SLG ends."}),
        }}

    def make(self, blocks, start_percent, end_percent) -> tuple:
        return (SLGArgs(parse_slg_blocks(blocks), float(start_percent), float(end_percent)),)


class WanGuidanceOptions:
    DESCRIPTION = ("Guidance options for the Wan Sampler: CFG-Zero* (optimised guidance scale, and zeroed "
                   "velocity for the first steps), a cfg value per step, and RIFLEx for videos longer than "
                   "the trained length.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("SLIP_WAN_GUIDANCE_ARGS",)
    RETURN_NAMES = ("guidance_args",)
    OUTPUT_TOOLTIPS = ("Guidance settings for the Wan Sampler's guidance_args input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "cfg_zero_star": ("BOOLEAN", {"default": True,
                                          "tooltip": "Scale the negative prediction by its optimal projection "
                                                     "(CFG-Zero*)."}),
            "zero_init_steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                        "tooltip": "CFG-Zero*: the first N steps output zero velocity."}),
            "cfg_per_step": ("STRING", {"default": "", "tooltip": "Comma-separated cfg, one per step (e.g. "
                                                                   "'6,6,5,4'); empty: the sampler's cfg."}),
            "riflex_freq_index": ("INT", {"default": 0, "min": 0, "max": 22,
                                          "tooltip": "RIFLEx for videos longer than the trained 81 frames: the "
                                                     "temporal RoPE frequency to retune (6 for Wan); 0 = off."}),
        }}

    def make(self, cfg_zero_star, zero_init_steps, cfg_per_step, riflex_freq_index=0) -> tuple:
        return (GuidanceArgs(bool(cfg_zero_star), int(zero_init_steps), parse_cfg_list(cfg_per_step),
                             int(riflex_freq_index)),)


class WanNagOptions:
    DESCRIPTION = ("Normalized Attention Guidance for the Wan Sampler: the negative prompt steers every block's "
                   "text cross-attention of the positive branch (extrapolate, clip by L1 norm, blend), so it "
                   "works at cfg 1 with distilled few-step models (CausVid, lightx2v), where CFG cannot. Costs "
                   "one more text attention per block. Works with cfg above 1 too.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("SLIP_WAN_NAG_ARGS",)
    RETURN_NAMES = ("nag_args",)
    OUTPUT_TOOLTIPS = ("NAG settings for the Wan Sampler's nag_args input.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "nag_scale": ("FLOAT", {"default": 11.0, "min": 1.0, "max": 100.0, "step": 0.01,
                                    "tooltip": "How far the attention is pushed away from the negative prompt "
                                               "(1 = no guidance)."}),
            "nag_tau": ("FLOAT", {"default": 2.5, "min": 0.0, "max": 10.0, "step": 0.01,
                                  "tooltip": "Clipping: the guided attention's L1 norm may grow to at most tau "
                                             "times the plain one's, per token."}),
            "nag_alpha": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Blend: the share of the guided attention in the result (the rest "
                                               "is the plain positive attention)."}),
        }, "optional": {
            "nag_text_embeds": ("SLIP_WAN_TEXT_EMBEDS", {"tooltip": "Its negative prompt is the one NAG steers away "
                                                                    "from; without it, the sampler's negative "
                                                                    "prompt."}),
        }}

    def make(self, nag_scale, nag_tau, nag_alpha, nag_text_embeds=None) -> tuple:
        negative = None
        if nag_text_embeds is not None:
            negative = nag_text_embeds.negative
            if negative is None:
                raise ValueError("Wan NAG Options: 'nag_text_embeds' holds no negative prompt; encode one with Wan "
                                 "Text Encode, or disconnect it to use the sampler's negative prompt.")
        return (NagArgs(float(nag_scale), float(nag_tau), float(nag_alpha), negative),)
