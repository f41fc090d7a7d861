"""Wan video nodes: model loader, its settings (block swap, compile, LoRA) and the sampler. The sampler's
option nodes are in nodes/wan_options.py; encoders, VAE and decode in nodes/wan_encoders.py.

Thin classes: every input has a tooltip, every value that travels is a frozen dataclass from
models/wan, and the work happens in models/wan (loading in model_loading.py, sampling in pipeline.py);
the nodes resolve names to paths, pick devices and pass the host's progress and notices in. LATENT is ComfyUI's raw-latent
convention, so core Wan nodes (WanImageToVideo, EmptyHunyuanLatentVideo, VAE Decode) mix with ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ..host import (
    ProgressBar,
    check_interrupt,
    compute_device,
    latent_previewer,
    list_models,
    make_room,
    model_folders,
    model_path,
    notice,
    offload_device,
    soft_empty_cache,
    vram_info,
)
from ..host.paths import list_model_files
from ..kernels.attention import backend_choices, require_backend
from ..kernels.precision import resolve_dtype
from ..models.checkpoint import load_state_dict
from ..models.finite import BadSettingError, finite_number
from ..models.gguf_file import GGUF_EXTS
from ..models.wan.core_source import LoraRecord, WanSource
from ..models.wan.lora import parse_blocks, parse_lora
from ..models.wan.model_loading import QUANTIZATIONS, LoadSettings, LoraFile, load_model, log_lora_report
from ..models.wan.pipeline import (
    RESUME_KEY,
    CompileSettings,
    SamplerSettings,
    SamplingExtras,
    SwapSettings,
    WanModelHandle,
    sample_video_full,
)
from ..models.wan.sampling import SCHEDULERS

log = logging.getLogger("slipstream.wan")

CATEGORY = "Slipstream/Wan"
# Speech models (nodes/wan_speech.py loads them): the sampler's audio inputs, shared with the long-video node.
SPEECH_SAMPLER_INPUTS = {
    "audio_embeds": ("SLIPSTREAM_WAN_AUDIO", {"tooltip": "From a MultiTalk or FantasyTalking embeds node: the speech "
                                                         "the video follows. Needs the speech model in the Wan "
                                                         "Model Loader; its num_frames must cover the video."}),
    "audio_cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 30.0, "step": 0.01,
                            "tooltip": "Audio guidance (official 4). 1.0 skips the no-audio pass (faster); with cfg "
                                       "above 1 too, each step runs three passes."}),
}
PRECISIONS = ("fp32", "bf16", "fp16")
LOAD_DEVICES = ("main_device", "offload_device")
# Wan Apply LoRA's modes: shown name -> models/wan/lora_runtime mode.
LORA_MODES = {"exact (patch weights at run time)": "exact", "additive (low memory, adds B*A*x)": "additive"}
LORA_MODES_DEFAULT = next(iter(LORA_MODES))


@dataclass(frozen=True)
class WanLora:
    """One LoRA of a chain (SLIP_WAN_LORA is a tuple of these)."""

    name: str
    strength: float
    blocks: tuple[int, ...] = ()    # transformer blocks it touches; () = all

    def describe(self) -> str:
        where = f" blocks {','.join(map(str, self.blocks))}" if self.blocks else ""
        return f"{self.name}:{self.strength:g}{where}"


# ---------------------------------------------------------------------------------- settings nodes


class WanBlockSwap:
    DESCRIPTION = ("Keeps some transformer blocks in RAM and streams each to the GPU just before it runs, on a "
                   "side stream, a few blocks ahead, never copying weights back. Swapped blocks are spread "
                   "evenly through the model so each transfer hides behind the blocks that stay. Connect to "
                   "the Wan Model Loader; the loader logs how much VRAM and RAM the plan uses.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("SLIP_BLOCKSWAP_ARGS",)
    RETURN_NAMES = ("block_swap_args",)
    OUTPUT_TOOLTIPS = ("Block swap settings for the Wan Model Loader.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "blocks_to_swap": ("INT", {"default": 20, "min": 0, "max": 48, "step": 1,
                                       "tooltip": "How many transformer blocks live in RAM (14B models have 40, "
                                                  "1.3B have 30). More = less VRAM; with video-length jobs "
                                                  "even all of them usually cost little speed."}),
            "offload_img_emb": ("BOOLEAN", {"default": False,
                                            "tooltip": "Also stream the CLIP image projection (I2V models)."}),
            "offload_txt_emb": ("BOOLEAN", {"default": False,
                                            "tooltip": "Also stream the text projection (about one block's size "
                                                       "on 14B)."}),
            "use_non_blocking": ("BOOLEAN", {"default": True,
                                             "tooltip": "Page-lock the RAM copies so transfers overlap compute. "
                                                        "Turn off if pinning memory fails on your system "
                                                        "(slower, same RAM)."}),
            "prefetch_blocks": ("INT", {"default": 1, "min": 0, "max": 40, "step": 1,
                                        "tooltip": "How many swapped blocks are fetched ahead. 1 hides transfers "
                                                   "behind compute in most cases; each extra one costs one "
                                                   "block of VRAM."}),
        }}

    def make(self, blocks_to_swap, offload_img_emb, offload_txt_emb, use_non_blocking, prefetch_blocks) -> tuple:
        for name, value in (("blocks_to_swap", blocks_to_swap), ("prefetch_blocks", prefetch_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadSettingError(f"Wan Block Swap: '{name}' must be a whole number, 0 or more; got {value!r} "
                                      f"({'0 keeps every block on the GPU' if name == 'blocks_to_swap' else '0 fetches each block just in time'}).")
        return (SwapSettings(blocks_to_swap, offload_txt_emb, offload_img_emb, use_non_blocking, prefetch_blocks),)


class WanCompileSettings:
    DESCRIPTION = ("torch.compile settings for the Wan Model Loader. Compiling the transformer blocks makes "
                   "steps faster and lowers peak VRAM after a one-time compile (needs Triton for 'inductor' on "
                   "GPU). The first run with a new size recompiles.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("SLIP_WAN_COMPILE_ARGS",)
    RETURN_NAMES = ("compile_args",)
    OUTPUT_TOOLTIPS = ("Compile settings for the Wan Model Loader.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "backend": (["inductor", "cudagraphs", "eager"], {"default": "inductor",
                                                             "tooltip": "inductor: generated kernels (fastest). "
                                                                        "cudagraphs: replays captured graphs. eager: "
                                                                        "trace only (for debugging)."}),
            "fullgraph": ("BOOLEAN", {"default": False, "tooltip": "Fail instead of splitting the graph where "
                                                                   "tracing breaks."}),
            "mode": (["default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"],
                     {"default": "default", "tooltip": "inductor mode; max-autotune compiles much longer."}),
            "dynamic": ("BOOLEAN", {"default": False, "tooltip": "Compile for varying shapes (fewer recompiles, "
                                                                 "slower kernels)."}),
            "dynamo_cache_size_limit": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 1,
                                                "tooltip": "Compiled variants kept per function."}),
            "dynamo_recompile_limit": ("INT", {"default": 128, "min": 0, "max": 1024, "step": 1,
                                               "tooltip": "Recompiles allowed before falling back to eager."}),
            "compile_transformer_blocks_only": ("BOOLEAN", {"default": True,
                                                            "tooltip": "Compile each block (quick, works with "
                                                                       "block swap) instead of the whole model."}),
        }}

    def make(self, backend, fullgraph, mode, dynamic, dynamo_cache_size_limit, dynamo_recompile_limit,
             compile_transformer_blocks_only) -> tuple:
        return (CompileSettings(backend, mode, fullgraph, dynamic, dynamo_cache_size_limit, dynamo_recompile_limit,
                                compile_transformer_blocks_only),)


class WanLoraSelect:
    DESCRIPTION = ("Picks a LoRA for Wan Apply LoRA (applied at run time: change the strength without reloading "
                   "the model) or for the Wan Model Loader's 'lora' input (merged into the weights at load). "
                   "Chain several through 'prev_lora'. Understands LoRA, LoHa, LoKr, DoRA and full-difference "
                   "(diff, diff_b, diff_m) files.")
    CATEGORY = CATEGORY
    FUNCTION = "select"
    RETURN_TYPES = ("SLIP_WAN_LORA",)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("This LoRA after the ones before it in the chain.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "lora": (list_models("loras") or ["(no loras found)"],
                     {"tooltip": "LoRA file from the loras folder (kohya, diffusion-pipe, PEFT or LyCORIS naming)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "How strongly it is applied; 0 skips it."}),
        }, "optional": {
            "prev_lora": ("SLIP_WAN_LORA", {"tooltip": "LoRAs selected before this one."}),
            "blocks": ("STRING", {"default": "",
                                  "tooltip": "Which transformer blocks it touches, e.g. '0-9, 15' (1.3B has blocks "
                                             "0-29, 14B 0-39). Empty = all. Layers outside the blocks (embeddings, "
                                             "head) are always patched."}),
        }}

    def select(self, lora, strength, prev_lora=None, blocks="") -> tuple:
        strength = finite_number("strength", strength, "Wan LoRA Select")
        chain = tuple(prev_lora or ())
        if strength != 0.0:
            model_path("loras", lora)   # fail now, naming the folder, not at load
            chain += (WanLora(lora, strength, parse_blocks(blocks or "")),)
        return (chain,)


class WanApplyLora:
    DESCRIPTION = ("Applies LoRAs to a loaded Wan model at run time, without merging: the weights stay as "
                   "loaded (fp8 and int8 keep their storage), so changing a strength re-runs only this node and "
                   "the sampler, never the model loader. 'exact' mode gives the merged result bit for bit (also in "
                   "bf16); 'additive' needs less memory. Works with block swap (the LoRA stays on the GPU, "
                   "outside the swapped weights). To merge instead, connect the LoRA to the Wan Model Loader.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("SLIP_WAN_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same loaded model with these LoRAs applied while it samples.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("SLIP_WAN_MODEL", {"tooltip": "From the Wan Model Loader (or another Wan Apply LoRA)."}),
            "lora": ("SLIP_WAN_LORA", {"tooltip": "From Wan LoRA Select; the chain is applied in order."}),
            "low_mem": ("BOOLEAN", {"default": False,
                                    "tooltip": "Keep the LoRA in RAM and copy each part to the GPU as its layer "
                                               "runs: no VRAM held by the LoRA, slower steps."}),
            "lora_mode": (list(LORA_MODES), {"default": LORA_MODES_DEFAULT,
                                             "tooltip": "exact: each patched layer builds W + strength·ΔW as it "
                                                        "runs, so bf16/fp16 give the merged result bit for bit "
                                                        "(fp8/int8 layers are widened, patched, computed in "
                                                        "float). additive: adds strength·B·A·x to the layer's "
                                                        "output, no weight-sized scratch, differs from merging "
                                                        "by bf16 rounding."}),
        }}

    def apply(self, model, lora, low_mem, lora_mode=None) -> tuple:
        from ..models.wan.lora_runtime import RuntimeLora, attach_chain

        mode = LORA_MODES.get(lora_mode or LORA_MODES_DEFAULT)
        if mode is None:
            raise BadSettingError(f"Wan Apply LoRA: 'lora_mode' must be one of {', '.join(LORA_MODES)}; got "
                                  f"{lora_mode!r}.")
        added = tuple(RuntimeLora(entry.name, parse_lora(load_state_dict(model_path("loras", entry.name)), model.dit),
                                  entry.strength, entry.blocks, bool(low_mem), mode) for entry in lora)
        chain = model.runtime_loras + added
        attached = attach_chain(model.dit, chain)   # checks now (no match, block range), attaches nothing
        attached.remove()
        for item, report in zip(chain[len(model.runtime_loras):], attached.reports[len(model.runtime_loras):],
                                strict=True):
            log_lora_report(item.describe(), report)
        return (replace(model, runtime_loras=chain),)


# ---------------------------------------------------------------------------------- model loader


def _diffusion_model_files() -> list[str]:
    """The diffusion_models folder's files, GGUF included (ComfyUI's own list leaves .gguf out)."""
    gguf_files = list_model_files(model_folders("diffusion_models"), GGUF_EXTS)
    return sorted(set(list_models("diffusion_models")) | set(gguf_files))


class WanModelLoader:
    DESCRIPTION = ("Loads a Wan 2.1 diffusion model (T2V or I2V, 1.3B or 14B, VACE, Fun InP/Control, Phantom; "
                   "official, ComfyUI or kijai file names, fp8 files and GGUF files) for the Wan Sampler. fp8 "
                   "storage halves VRAM; GGUF files stay quantized and are expanded layer by layer; block swap "
                   "keeps blocks in RAM; LoRAs connected here are merged at load (use Wan Apply LoRA to apply "
                   "them at run time instead).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("SLIP_WAN_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded Wan model, for the Wan Sampler.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": (_diffusion_model_files() or ["(no models found)"],
                      {"tooltip": "Wan 2.1 DiT file from models/diffusion_models, e.g. "
                                  "wan2.1_t2v_1.3B_fp16.safetensors, or a GGUF such as "
                                  "wan2.1-t2v-14b-Q4_K_M.gguf (keep quantization 'disabled')."}),
            "base_precision": (list(PRECISIONS), {"default": "bf16",
                                                  "tooltip": "Compute precision. bf16 on RTX 30xx and newer, fp16 on "
                                                             "older GPUs, fp32 on CPU."}),
            "quantization": (list(QUANTIZATIONS), {"default": "disabled",
                                                   "tooltip": "Storage of the big block weights: fp8 halves their "
                                                              "memory (fp8 files are kept as fp8 automatically). "
                                                              "'_fast' also multiplies in fp8 on RTX 40xx / "
                                                              "H100 and newer (elsewhere: plain fp8, with a note)."}),
            "load_device": (list(LOAD_DEVICES), {"default": "main_device",
                                                 "tooltip": "Where weights wait between runs: main_device (GPU, "
                                                            "fast start) or offload_device (RAM, frees VRAM for "
                                                            "other models)."}),
        }, "optional": {
            "attention_mode": (backend_choices(), {"default": "auto",
                                                   "tooltip": "auto picks the fastest exact backend installed. "
                                                              "flash_attn / sageattn need their packages."}),
            "compile_args": ("SLIP_WAN_COMPILE_ARGS", {"tooltip": "From Wan Compile Settings (optional)."}),
            "block_swap_args": ("SLIP_BLOCKSWAP_ARGS", {"tooltip": "From Wan Block Swap (optional)."}),
            "lora": ("SLIP_WAN_LORA", {"tooltip": "From Wan LoRA Select (optional): merged into the weights at "
                                                  "load. A strength change reloads the model; Wan Apply LoRA "
                                                  "avoids that."}),
            "speech_model": ("SLIPSTREAM_WAN_SPEECH_MODEL", {
                "tooltip": "From Wan Speech Model Loader (optional): MultiTalk / InfiniteTalk or FantasyTalking "
                           "weights added to this I2V model before quantization and block swap, so both cover "
                           "them. Then feed the sampler audio embeds."}),
        }}

    def load(self, model, base_precision, quantization, load_device, attention_mode="auto", compile_args=None,
             block_swap_args=None, lora=None, speech_model=None) -> tuple:
        require_backend(attention_mode)
        path = model_path("diffusion_models", model)
        device = compute_device()
        settings = LoadSettings(
            dtype=resolve_dtype(base_precision, device), quantization=quantization, device=device,
            resident=device if load_device == "main_device" else offload_device(), offload=offload_device(),
            attention_mode=attention_mode, compile=compile_args, swap=block_swap_args, speech_model=speech_model,
            loras=tuple(LoraFile(model_path("loras", entry.name), entry.strength, entry.blocks, entry.describe())
                        for entry in (lora or ())))
        vram = vram_info(device) if settings.swapping else None
        bars: list[ProgressBar] = []

        def on_layer(done: int, total: int) -> None:
            if not bars:
                bars.append(ProgressBar(1))
            bars[0].update_absolute(done, total)

        try:
            handle = load_model(path, settings, name=model.rsplit("/", 1)[-1], on_layer=on_layer,
                                notice=lambda message: notice("Wan Model Loader", message),
                                free_vram=None if vram is None else vram[0])
        finally:
            for bar in bars:
                bar.close()
        log.info("Wan: loaded %s (%s, %s, %s)", handle.name, handle.dit.config.name, base_precision, quantization)
        source = WanSource(path, base_precision, quantization,
                           tuple(LoraRecord(e.name, model_path("loras", e.name), e.strength, e.blocks)
                                 for e in (lora or ())),
                           None if speech_model is None else f"{speech_model.name} ({speech_model.label})",
                           compile_args is not None)
        return (replace(handle, source=source),)


# ---------------------------------------------------------------------------------- sampler


def _latent_tensor(latent, name: str) -> torch.Tensor:
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"'{name}' is not a LATENT (no 'samples' entry): connect a LATENT output, e.g. an "
                         "earlier Wan Sampler or Empty Hunyuan Latent Video.")
    return latent["samples"]


class WanSampler:
    DESCRIPTION = ("Generates a Wan video latent from text (and a start image for I2V). Same seed, same "
                   "video. Options: context windows, Enhance-A-Video, step caches, SLG, CFG-Zero*, vid2vid from "
                   "'samples', a part of the schedule (start/end step) for split or refine runs, a SIGMAS "
                   "schedule, a Wan 2.2 A14B low-noise expert, and speech-driven video (audio_embeds with a "
                   "MultiTalk / FantasyTalking model in the loader). Outputs the latent and the denoised "
                   "prediction as standard LATENTs.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("samples", "denoised_samples")
    OUTPUT_TOOLTIPS = ("The video latent [B,16,1+(F-1)/4,H/8,W/8] in ComfyUI's raw-latent convention (still "
                       "noisy when end_step stops early; feed it to a second sampler with add_noise off).",
                       "The model's clean (x0) prediction at the last step run.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("SLIP_WAN_MODEL", {"tooltip": "From the Wan Model Loader (for Wan 2.2 A14B: the high-noise "
                                                    "expert)."}),
            "image_embeds": ("SLIP_WAN_IMAGE_EMBEDS", {"tooltip": "Size and frames (Wan Empty Embeds) or the I2V "
                                                                  "conditioning (Wan Image to Video Encode)."}),
            "text_embeds": ("SLIP_WAN_TEXT_EMBEDS", {"tooltip": "From Wan Text Encode."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 1000, "step": 1,
                              "tooltip": "Denoising steps (official: 50 T2V, 40 I2V; 30 is usually enough)."}),
            "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 30.0, "step": 0.01,
                              "tooltip": "Prompt guidance (of the high-noise expert for A14B). 1.0 skips the "
                                         "negative prompt (twice as fast)."}),
            "shift": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                "tooltip": "Noise schedule shift: 5 official, 3 for 480p I2V, 8-12 for 1.3B T2V."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Noise seed (CPU generator: the same on every GPU)."}),
            "scheduler": (list(SCHEDULERS), {"default": "unipc",
                                             "tooltip": "Solver and schedule: unipc (official), dpm++ (2M), euler, "
                                                        "dpm++_sde, deis, lcm (distill LoRAs), res_multistep, "
                                                        "er_sde, dpm++_3m_sde; '/beta' = beta-spaced steps; flowmatch_causvid "
                                                        "and flowmatch_distill = the distilled models' fixed "
                                                        "timesteps."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "Below 1 with 'samples': how much of the input latent to repaint."}),
            "force_offload": ("BOOLEAN", {"default": True,
                                          "tooltip": "Move the model to RAM after sampling so the VAE has room."}),
            "batched_cfg": (["auto", "on", "off"], {"default": "auto",
                                                    "tooltip": "Run the positive and negative prompts as one batch "
                                                               "(faster, streams swapped blocks once per step). "
                                                               "auto: when the VRAM free allows it."}),
        }, "optional": {
            "samples": ("LATENT", {"tooltip": "Start from this latent (vid2vid with denoise < 1, or the noisy "
                                              "output of a first sampler with add_noise off). Core Wan latents "
                                              "work too."}),
            "context_options": ("SLIP_WAN_CONTEXT", {"tooltip": "From Wan Context Options (long videos)."}),
            "feta_args": ("SLIP_WAN_FETA_ARGS", {"tooltip": "From Wan Enhance-A-Video."}),
            "cache_args": ("SLIP_WAN_CACHE_ARGS", {"tooltip": "From Wan Cache Args (TeaCache/MagCache/EasyCache)."}),
            "slg_args": ("SLIP_WAN_SLG_ARGS", {"tooltip": "From Wan Skip Layer Guidance."}),
            "guidance_args": ("SLIP_WAN_GUIDANCE_ARGS", {"tooltip": "From Wan Guidance Options (CFG-Zero*, "
                                                                    "cfg per step)."}),
            "sigmas": ("SIGMAS", {"tooltip": "A schedule (core SIGMAS, flow σ in [0, 1]) that replaces steps, "
                                             "shift, scheduler spacing and denoise."}),
            "start_step": ("INT", {"default": 0, "min": 0, "max": 10000,
                                   "tooltip": "First step to run (core KSamplerAdvanced's start_at_step)."}),
            "end_step": ("INT", {"default": -1, "min": -1, "max": 10000,
                                 "tooltip": "Stop before this step (-1: at the end); the output is then still "
                                            "noisy, for a second sampler."}),
            "add_noise": ("BOOLEAN", {"default": True,
                                      "tooltip": "Noise 'samples' to the start step. Off: 'samples' is already "
                                                 "noisy (from a sampler that stopped at end_step)."}),
            "low_noise_model": ("SLIP_WAN_MODEL", {"tooltip": "Wan 2.2 A14B: the low-noise expert; steps below the "
                                                              "boundary run on it, and only one expert sits in "
                                                              "VRAM at a time."}),
            "boundary": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.001,
                                   "tooltip": "A14B switch point as a fraction of the timestep range; -1: "
                                              "official (t2v 0.875, i2v 0.900)."}),
            "cfg_low_noise": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.01,
                                        "tooltip": "cfg of the low-noise expert; -1: official (t2v 3.0, "
                                                   "i2v 3.5)."}),
            "nag_args": ("SLIP_WAN_NAG_ARGS", {"tooltip": "From Wan NAG Options (negative prompt at cfg 1)."}),
            **SPEECH_SAMPLER_INPUTS,
        }}

    def sample(self, model, image_embeds, text_embeds, steps, cfg, shift, seed, scheduler, denoise, force_offload,
               batched_cfg, samples=None, context_options=None, feta_args=None, cache_args=None, slg_args=None,
               guidance_args=None, sigmas=None, start_step=0, end_step=-1, add_noise=True, low_noise_model=None,
               boundary=-1.0, cfg_low_noise=-1.0, nag_args=None, audio_embeds=None, audio_cfg=4.0) -> tuple:
        device = compute_device()
        sigma_values = None if sigmas is None else tuple(float(v) for v in torch.as_tensor(sigmas).flatten())
        settings = SamplerSettings(
            steps, cfg, shift, seed, scheduler, denoise, batched_cfg, start_step=int(start_step),
            end_step=int(end_step), add_noise=bool(add_noise), sigmas=sigma_values,
            boundary=None if boundary is None or boundary < 0 else float(boundary),
            cfg_low_noise=None if cfg_low_noise is None or cfg_low_noise < 0 else float(cfg_low_noise))
        start = None if samples is None else _latent_tensor(samples, "samples")
        batch = 1 if start is None else start.shape[0]
        vram = vram_info(device)
        if vram is not None:  # ask the host to unload other models first (ComfyUI does not manage ours)
            make_room(_resident_bytes(model), device)
            vram = vram_info(device)
        total = (len(sigma_values) - 1 if sigma_values else steps) * batch
        bar = ProgressBar(total)
        previewer = latent_previewer("wan21")
        latest: dict[str, torch.Tensor] = {}

        def progress(value, total):
            shown = previewer(latest.pop("x0")) if previewer is not None and "x0" in latest else None
            bar.update_absolute(value, total, preview=shown)

        extras = SamplingExtras(cache_args, slg_args, guidance_args, nag=nag_args, audio=audio_embeds,
                                audio_cfg=finite_number("audio_cfg", audio_cfg, "Wan Sampler"))
        try:
            result = sample_video_full(
                model, text_embeds, image_embeds, settings, device=device, samples=start, context=context_options,
                feta=feta_args, force_offload=force_offload, free_memory=None if vram is None else vram[0],
                progress=progress, check_interrupt=check_interrupt, low_noise=low_noise_model, extras=extras,
                resume=None if samples is None else samples.get(RESUME_KEY),
                preview=None if previewer is None else (lambda x0: latest.__setitem__("x0", x0)))
        finally:
            bar.close()
            if force_offload:
                soft_empty_cache()
        out = {"samples": result.latent}
        if result.resume is not None:
            out[RESUME_KEY] = result.resume
        return (out, {"samples": result.denoised})


def _resident_bytes(handle: WanModelHandle) -> int:
    """Bytes the model occupies on the compute device while sampling (resident part + swap ring +
    run-time LoRAs)."""
    from ..models.wan.lora_runtime import chain_device_bytes

    total = sum(p.numel() * p.element_size() for p in handle.dit.parameters())
    total += chain_device_bytes(handle.runtime_loras, handle.dit)   # run-time LoRAs live beside the weights
    host_blocks = handle.host_blocks
    if host_blocks is None:
        return total
    ring = (handle.swap.prefetch_blocks + 1) * host_blocks.slot_bytes
    return total - host_blocks.host_bytes + ring
