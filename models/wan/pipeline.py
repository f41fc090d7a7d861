"""Wan 2.1 text/image-to-video sampling: noise, solver loop, CFG, context windows, FETA, block swap.

    latent = sample_video(handle, text, image, SamplerSettings(steps=30, cfg=6.0, shift=5.0, seed=1),
                          device=torch.device("cuda"), progress=bar.update_absolute, check_interrupt=check)

Values crossing node boundaries are small frozen dataclasses (`WanModelHandle`, `WanTextEmbeds`,
`WanImageEmbeds`) or raw latents: latents on the wire use ComfyUI's convention (the VAE's raw
output); normalisation to the DiT's statistics happens here, inside, and nowhere else.

A run may cover part of the schedule (start_step/end_step, as core's KSamplerAdvanced) and hands
its solver history on in `SampleResult.resume`, so two samplers split at step k give exactly the
unsplit result. With a Wan 2.2 A14B low-noise expert the steps below the boundary run on it and the
idle expert is kept off the compute device (models/wan/experts.py). The guided evaluation itself
(CFG, windows, FETA, SLG, CFG-Zero*, RIFLEx, step caches) is models/wan/denoiser.py.

Per step the DiT sees the latent once per context window; CFG runs cond and uncond as one batch
of two when memory allows (so a swapped block crosses the bus once per step, not twice), else
as two passes. `check_interrupt` runs before every step and every block, so a stop request takes
effect within one block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ...kernels.blockswap import HostBlocks, SwapSession, default_transport, swap_indices
from ..finite import finite_input
from . import fun
from .clean_frames import check_vae_generation, check_video_size, video_latent_shape
from .context import ContextOptions, freenoise
from .core_source import WanSource
from .denoiser import SamplingExtras, WanDenoiser
from .dit import WanDiT
from .experts import check_expert_pair, expert_variant, plan_experts
from .feta import FetaArgs
from .guidance import check_cfg_list
from .lora_runtime import RuntimeLora, attach_chain
from .sampling import SCHEDULERS, Schedule, make_schedule, make_solver, schedule_from_sigmas
from .sizes import SIZE_MULTIPLE, round_video_size  # noqa: F401  (imported from here by the nodes)
from .speech_sampling import MotionLatent, hold_given, speech_extras
from .step_cache import CacheArgs, StepCache
from .vace import VaceInput, check_chain
from .vae import denormalize_latent, normalize_latent

log = logging.getLogger("slipstream.wan")

LATENT_CHANNELS = 16


# ---------------------------------------------------------------------------------- settings & values


@dataclass(frozen=True)
class SwapSettings:
    """Block swap as the user asked for it (see kernels/blockswap.py for what it does)."""

    blocks_to_swap: int = 20
    offload_txt_emb: bool = False
    offload_img_emb: bool = False
    use_non_blocking: bool = True
    prefetch_blocks: int = 1


@dataclass(frozen=True)
class CompileSettings:
    backend: str = "inductor"
    mode: str = "default"
    fullgraph: bool = False
    dynamic: bool = False
    dynamo_cache_size_limit: int = 64
    dynamo_recompile_limit: int = 128
    blocks_only: bool = True


@dataclass(frozen=True)
class WanModelHandle:
    """A loaded DiT and how to run it. The module is shared by every handle made from it."""

    dit: WanDiT
    name: str
    resident_device: torch.device            # where the non-swapped weights wait between runs
    swap: SwapSettings | None = None
    host_blocks: HostBlocks | None = None    # the swapped units' host copies (built at load)
    quantization: str = "disabled"
    loras: tuple[str, ...] = ()
    runtime_loras: tuple[RuntimeLora, ...] = ()   # applied unmerged, for the length of each run
    source: WanSource | None = None          # what the loader built it from (for the core MODEL bridge)

    @property
    def config(self):
        return self.dit.config


@dataclass(frozen=True)
class WanTextEmbeds:
    """umT5 embeddings, trimmed to their real length: positive prompts ([L_i, D] each; several when the
    prompt was split with '|', spread over the video's sections), the negative one ([L, D]) or None."""

    positive: tuple[torch.Tensor, ...]
    negative: torch.Tensor | None = None


@dataclass(frozen=True)
class WanImageEmbeds:
    """What the sampler generates: the video size, and for image-to-video the conditioning.

    y: [20, T, h, w] = 4 mask channels (1 on given frames) + 16 *normalised* image-latent channels.
    clip / negative_clip: [1, tokens, width] CLIP-vision features (None for text-to-video).
    clean_latent / denoise_mask (Wan 2.2 TI2V, see clean_frames.py): [C, T, h, w] normalised latent of
    the given frames and [1, T, h, w] mask, 0 where the latent is given and stays clean.
    vace: VACE inputs for a VACE model (Wan VACE Encode, chained); their reference images are
    extra latent frames in front, cut off the sampled latent.
    subject: [16, R, h, w] normalised Phantom subject latents, appended after the video's frames
    for the positive pass (zeros for the negative one) and cut off each prediction.
    """

    width: int
    height: int
    num_frames: int
    y: torch.Tensor | None = None
    clip: torch.Tensor | None = None
    negative_clip: torch.Tensor | None = None
    clean_latent: torch.Tensor | None = None
    denoise_mask: torch.Tensor | None = None
    vace: tuple[VaceInput, ...] = ()
    subject: torch.Tensor | None = None
    subject_cfg: float = 0.0                   # > 0: Phantom's separate subject guidance (guidance.py)
    reference: torch.Tensor | None = None      # [16, h, w] Fun reference-image latent (models/wan/fun.py)
    fun_mask: torch.Tensor | None = None       # [4, T, h, w] Wan 2.2 Fun Control start-frame mask (fun.py)
    motion: MotionLatent | None = None         # streaming speech clip's held latent frames (speech_sampling.py)

    @property
    def ref_frames(self) -> int:
        """Latent frames in front of the video that only condition it (VACE reference images)."""
        return self.vace[0].ref_frames if self.vace else 0

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (LATENT_CHANNELS, (self.num_frames - 1) // 4 + 1 + self.ref_frames, self.height // 8, self.width // 8)


MAX_SEED = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class SamplerSettings:
    """What the user asked the sampler for.

    `start_step` / `end_step` run only part of the `steps`-step schedule (end_step -1: to the end),
    as core's KSamplerAdvanced does; `add_noise` False takes `samples` as already noisy at the
    start step (the second half of a split run). `sigmas` (steps + 1 values ending at 0, the core
    SIGMAS type) replaces the schedule. `cfg_per_step` (one value per step) replaces `cfg`.
    `boundary` / `cfg_low_noise` are for two-expert (Wan 2.2 A14B) runs; None = the official value.
    """

    steps: int = 30
    cfg: float = 6.0
    shift: float = 5.0
    seed: int = 0
    scheduler: str = "unipc"
    denoise: float = 1.0
    batched_cfg: str = "auto"   # "auto" | "on" | "off"
    start_step: int = 0
    end_step: int = -1
    add_noise: bool = True
    sigmas: tuple[float, ...] | None = None
    cfg_per_step: tuple[float, ...] | None = None
    boundary: float | None = None
    cfg_low_noise: float | None = None

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler '{self.scheduler}'. Valid choices: {', '.join(SCHEDULERS)}.")
        if self.batched_cfg not in ("auto", "on", "off"):
            raise ValueError(f"batched_cfg must be auto, on or off, got '{self.batched_cfg}': pick one of those "
                             "(auto batches the two prompts when the free VRAM allows it).")
        for name in ("cfg", "shift", "denoise"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}: set the sampler's '{name}' to a "
                                 "number (defaults: cfg 6, shift 5, denoise 1).")
        if self.cfg < 0:
            raise ValueError(f"cfg must be >= 0, got {self.cfg}: use 1 to skip the negative prompt, or a value "
                             "above 1 (e.g. 5-6) to guide by it.")
        if not 0 <= int(self.seed) <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2^64-1], got {self.seed}: pick a seed between 0 and {MAX_SEED}.")
        if self.cfg_per_step is not None and any(not math.isfinite(c) or c < 0 for c in self.cfg_per_step):
            raise ValueError(f"Every per-step cfg must be a finite number >= 0, got {list(self.cfg_per_step)}: fix "
                             "Wan Guidance Options' cfg_per_step (comma-separated numbers, e.g. '6,6,5,4').")

    def step_range(self, steps: int) -> tuple[int, int]:
        """[start, end) of the steps this run takes, checked against a schedule of `steps` steps."""
        end = steps if self.end_step < 0 else min(self.end_step, steps)
        if not 0 <= self.start_step < end:
            raise ValueError(f"start_step {self.start_step} / end_step {self.end_step} leave no step to run "
                             f"in a {steps}-step schedule: start_step must be below end_step (and below {steps}).")
        return self.start_step, end


@dataclass
class RunStats:
    """What a sampling run did (for logs and tests)."""

    forwards: int = 0
    batched_cfg: bool = False
    windows_per_step: list[int] = field(default_factory=list)
    swap: dict[str, int] = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)          # per step: "single", "high" or "low"
    branches_computed: int = 0                                # CFG branches whose blocks really ran
    cache_skipped: int = 0                                    # branch evaluations a step cache replaced
    cache_by_branch: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- block swap & placement


def swap_units(dit: WanDiT, swap: SwapSettings) -> tuple[list[nn.Module], tuple[int, ...]]:
    """The swappable units in execution order (text/image embedders, then blocks) and which are swapped."""
    units: list[nn.Module] = []
    swapped: list[int] = []
    if swap.offload_txt_emb:
        swapped.append(len(units))
        units.append(dit.text_embedding)
    if swap.offload_img_emb and hasattr(dit, "img_emb"):
        swapped.append(len(units))
        units.append(dit.img_emb)
    first_block = len(units)
    vace_blocks = list(getattr(dit, "vace_blocks", ()))
    # VACE blocks are swapped in the same share as the main blocks and listed where they run
    # (right after their main block), so the prefetch order is the execution order.
    vace_swapped = set(swap_indices(len(vace_blocks), round(swap.blocks_to_swap * len(vace_blocks)
                                                            / max(1, len(dit.blocks)))))
    swapped_blocks = set(swap_indices(len(dit.blocks), swap.blocks_to_swap))
    vace_after = {layer: n for n, layer in enumerate(dit.config.vace_layers)}
    for i, block in enumerate(dit.blocks):
        if i in swapped_blocks:
            swapped.append(len(units))
        units.append(block)
        n = vace_after.get(i)
        if n is not None and n < len(vace_blocks):
            if n in vace_swapped:
                swapped.append(len(units))
            units.append(vace_blocks[n])
    assert len(units) - first_block == len(dit.blocks) + len(vace_blocks)
    return units, tuple(swapped)


def build_host_blocks(dit: WanDiT, swap: SwapSettings) -> HostBlocks:
    """Move the swapped units' weights into flat host buffers (once, at load)."""
    units, swapped = swap_units(dit, swap)
    return HostBlocks(units, swapped, pin=swap.use_non_blocking)


@contextmanager
def model_on_device(handle: WanModelHandle, device: torch.device, force_offload: bool,
                    on_block: Callable[[int], None] | None = None) -> Iterator[SwapSession | None]:
    """Put the resident weights on `device` (and open a swap session) for the duration of a run."""
    dit = handle.dit
    host = handle.host_blocks

    def put_back() -> None:
        if force_offload and device != handle.resident_device:
            if host is None:
                dit.to(handle.resident_device)
            else:
                host.move_rest(dit, handle.resident_device)

    # The stack closes the swap session before the weights go back, and hands it the real exception
    # of a failed run (an interrupt, an OOM) rather than a clean exit.
    with ExitStack() as stack:
        stack.callback(put_back)
        if host is None:
            dit.to(device)
            yield None
            return
        host.move_rest(dit, device)
        units, _ = swap_units(dit, handle.swap)
        transport = default_transport(device, non_blocking=handle.swap.use_non_blocking)
        yield stack.enter_context(SwapSession(host, units, transport, prefetch=handle.swap.prefetch_blocks, root=dit))


def cfg_batch_fits(tokens: int, dim: int, ffn_dim: int, dtype_bytes: int, free_bytes: int | None) -> bool:
    """Whether cond and uncond fit as one batch: the extra peak of a second sample (its FFN hidden
    state, q/k/v/o and fp32 residual) must leave a quarter of the free memory unused."""
    if free_bytes is None:
        return True
    extra = tokens * (2 * ffn_dim * dtype_bytes + 4 * dim * dtype_bytes + 3 * dim * 4)
    return extra < 0.75 * free_bytes


def apply_compile(dit: WanDiT, settings: CompileSettings) -> None:
    """torch.compile every block in place (module names and state-dict keys unchanged), or the whole model."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = settings.dynamo_cache_size_limit
    # Unmerged LoRAs hook layers inside compiled blocks for each run: compiled code must notice them.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = settings.dynamo_recompile_limit
    kwargs = {"backend": settings.backend, "fullgraph": settings.fullgraph, "dynamic": settings.dynamic}
    if settings.backend == "inductor":
        kwargs["mode"] = settings.mode
    targets = list(dit.blocks) + list(getattr(dit, "vace_blocks", ())) if settings.blocks_only else [dit]
    for module in targets:
        module.compile(**kwargs)


# ---------------------------------------------------------------------------------- sampling


def initial_noise(shape: Sequence[int], seed: int, context: ContextOptions | None) -> torch.Tensor:
    """Seeded CPU noise [1, *shape] (the same on every device), FreeNoise-shuffled when asked."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn((1, *shape), generator=generator, dtype=torch.float32)
    if context is not None and context.freenoise:
        size, _, overlap = context.latent()
        noise = freenoise(noise, size, overlap, generator, frame_dim=2)
    return noise


def check_inputs(handle: WanModelHandle, text: WanTextEmbeds, image: WanImageEmbeds,
                 samples: torch.Tensor | None, settings: SamplerSettings) -> None:
    """Every mismatch a user can wire up, as one clear error before any work starts."""
    cfg = handle.config
    image = fun.checked_for_model(cfg, handle.name, image)
    if not text.positive:
        raise ValueError("The text embeds hold no positive prompt.")
    for i, prompt in enumerate(text.positive):
        finite_input(f"text_embeds (prompt {i + 1})", prompt, "Wan Sampler")
    if text.negative is not None:
        finite_input("text_embeds (negative prompt)", text.negative, "Wan Sampler")
    width = text.positive[0].shape[-1]
    if width != cfg.text_dim:
        raise ValueError(f"The text embeds are {width} wide but {handle.name} expects {cfg.text_dim} "
                         "(umT5-XXL): use the text encoder that belongs to this model.")
    check_vae_generation(cfg, handle.name, image.y, image.clean_latent)
    check_video_size(cfg, handle.name, image.width, image.height)
    if cfg.has_image_input and image.y is None:
        raise ValueError(f"{handle.name} is an image-to-video model: connect Wan Image to Video Encode (with a "
                         "start image and CLIP vision embeds) instead of Wan Empty Embeds.")
    if not cfg.has_image_input and image.y is not None:
        raise ValueError(f"{handle.name} is a text-to-video model but the image embeds carry a start image; "
                         "load an image-to-video (i2v) model, or use Wan Empty Embeds.")
    if cfg.has_image_input and image.y.shape[0] != cfg.cond_channels:
        raise ValueError(f"The image embeds carry {image.y.shape[0]} conditioning channels but {handle.name} takes "
                         f"{cfg.cond_channels}: use Wan Fun Control Encode for Fun Control models (in_dim 48/52) and "
                         "Wan Image to Video Encode for I2V and Fun InP models (in_dim 36).")
    if image.vace and not cfg.is_vace:
        raise ValueError(f"The image embeds carry a VACE control input but {handle.name} is not a VACE model: "
                         "load a Wan VACE checkpoint (e.g. wan2.1_vace_14B), or use Wan Empty Embeds.")
    check_chain(image.vace)
    if cfg.has_clip and image.clip is not None and image.clip.shape[-1] != cfg.clip_dim:
        raise ValueError(f"The CLIP embeds are {image.clip.shape[-1]} wide but {handle.name} expects {cfg.clip_dim}.")
    c, t, h, w = video_latent_shape(cfg, image.width, image.height, image.num_frames)
    shape = (c, t + image.ref_frames, h, w)   # VACE reference frames in front
    if samples is not None:
        if samples.dim() != 5 or tuple(samples.shape[1:]) != shape:
            raise ValueError(f"The samples latent {tuple(samples.shape)} does not match the size the embeds ask "
                             f"for ({image.width}x{image.height}, {image.num_frames} frames → [B, {', '.join(map(str, shape))}]).")
        if not torch.isfinite(samples).all():
            raise ValueError("The samples latent contains NaN or inf values: re-encode it (or check the node that "
                             "made it); nothing was sampled.")
    elif settings.denoise < 1.0:
        raise ValueError("denoise below 1.0 needs a latent to start from: connect 'samples' (or set denoise to 1.0).")
    elif not settings.add_noise:
        raise ValueError("add_noise off needs a noisy latent to continue from: connect 'samples' (the output of "
                         "a first sampler that stopped at end_step), or turn add_noise on.")
    batch = 1 if samples is None else samples.shape[0]
    if int(settings.seed) + batch - 1 > MAX_SEED:
        raise ValueError(f"seed {settings.seed} with a batch of {batch} runs past 2^64-1 (each item uses seed + "
                         f"its index): use a seed of at most {MAX_SEED - batch + 1}.")


class NonFiniteError(ValueError):
    """The latent became NaN/inf during sampling."""


def _check_finite(x: torch.Tensor, step: int, steps: int, handle: WanModelHandle) -> None:
    if torch.isfinite(x).all():
        return
    dtype = handle.dit.compute_dtype
    cause = ("the model runs in fp16, whose range Wan's activations overflow: load it with base_precision bf16 "
             "(or fp32)") if dtype == torch.float16 else \
        ("check the model and LoRA files for NaN weights (a broken download or merge) and the input embeds/latent "
         "for NaN")
    raise NonFiniteError(f"Wan Sampler: step {step + 1} of {steps} produced NaN/inf values with {handle.name}; "
                         f"stopped there. Likely cause: {cause}.")


@dataclass
class SampleResult:
    latent: torch.Tensor                     # raw latent [B, 16, T, h, w] after end_step
    denoised: torch.Tensor                   # raw x0 prediction of the last step run
    resume: dict | None = None               # solver history for a sampler continuing at end_step


RESUME_KEY = "slipstream_wan_resume"


def _resume_states(resume: dict | None, scheduler: str, sigmas, start: int, batch: int) -> list[dict] | None:
    """The solver states to continue with, when `resume` came from the same schedule at this step."""
    if not resume or resume.get("scheduler") != scheduler or resume.get("step") != start:
        return None
    if tuple(resume.get("sigmas", ())) != tuple(sigmas) or len(resume.get("states", ())) != batch:
        return None
    return resume["states"]


def sample_video(handle: WanModelHandle, text: WanTextEmbeds, image: WanImageEmbeds, settings: SamplerSettings,
                 **kwargs) -> torch.Tensor:
    """Generate a raw video latent [B, 16, T, h, w] (float32, CPU); see `sample_video_full`."""
    return sample_video_full(handle, text, image, settings, **kwargs).latent


def _schedule_for(settings: SamplerSettings, handle: WanModelHandle) -> Schedule:
    if settings.sigmas is not None:
        return schedule_from_sigmas(settings.sigmas)
    return make_schedule(settings.scheduler, settings.steps, settings.shift, settings.denoise, handle.config.dim)


class _Experts:
    """Which DiT is on the compute device: at most one of the two A14B experts at a time."""

    def __init__(self, device: torch.device, force_offload: bool):
        self.device = device
        self.force_offload = force_offload
        self.active: WanModelHandle | None = None
        self.stack: ExitStack | None = None
        self.swap: dict[str, int] = {}

    def activate(self, handle: WanModelHandle, more_after: bool) -> None:
        if self.active is handle:
            return
        self.release()
        self.stack = ExitStack()
        session = self.stack.enter_context(model_on_device(handle, self.device, self.force_offload or more_after))
        # After model_on_device: block swap's hooks must be registered before the LoRA hooks.
        self.stack.enter_context(attach_chain(handle.dit, handle.runtime_loras))
        self.stack.callback(lambda: self.swap.update(session.stats()) if session is not None else None)
        self.active = handle

    def release(self) -> None:
        if self.stack is not None:
            stack, self.stack, self.active = self.stack, None, None
            stack.close()


def sample_video_full(handle: WanModelHandle, text: WanTextEmbeds, image: WanImageEmbeds,
                      settings: SamplerSettings, *, device: torch.device, samples: torch.Tensor | None = None,
                      context: ContextOptions | None = None, feta: FetaArgs | None = None,
                      force_offload: bool = True, free_memory: int | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      check_interrupt: Callable[[], None] | None = None, stats: RunStats | None = None,
                      low_noise: WanModelHandle | None = None, extras: SamplingExtras | None = None,
                      resume: dict | None = None,
                      preview: Callable[[torch.Tensor], None] | None = None) -> SampleResult:
    """Sample steps [start_step, end_step) of the schedule. `samples` (raw, optional) is the latent to
    start from: noised to the start step's σ when `add_noise`, taken as it is otherwise. With
    `low_noise` (a Wan 2.2 A14B low-noise expert) the steps below the boundary run on it, and only
    the expert in use sits on `device`. `preview(x0)` receives each step's raw x0 prediction."""
    check_inputs(handle, text, image, samples, settings)
    extras = speech_extras(handle, image, extras or SamplingExtras(), context)
    if low_noise is not None:
        check_expert_pair(handle, low_noise)
        check_inputs(low_noise, text, image, samples, settings)
    if extras.slg is not None:
        extras.slg.check_model(len(handle.dit.blocks), handle.name)
    stats = stats if stats is not None else RunStats()
    c, t, h, w = video_latent_shape(handle.config, image.width, image.height, image.num_frames)
    shape = (c, t + image.ref_frames, h, w)   # VACE reference frames in front
    schedule = _schedule_for(settings, handle)
    if settings.sigmas is not None and settings.start_step >= schedule.steps:
        raise ValueError(f"start_step {settings.start_step} is past the {schedule.steps} steps the SIGMAS input holds "
                         f"({schedule.steps + 1} values): set start_step below {schedule.steps}, or give the "
                         "sigmas of the whole schedule (a SplitSigmas low part already starts at its own step 0).")
    start, end = settings.step_range(schedule.steps)
    if settings.sigmas is not None and settings.end_step > schedule.steps:
        raise ValueError(f"end_step {settings.end_step} is past the {schedule.steps} steps the SIGMAS input holds "
                         f"({schedule.steps + 1} values): set end_step to {schedule.steps} or -1, or give more sigmas.")
    cfg_list = settings.cfg_per_step or (extras.guidance.cfg_per_step if extras.guidance else None)
    check_cfg_list(cfg_list, schedule.steps)
    plan = None
    if low_noise is not None:
        plan = plan_experts(expert_variant(handle.config), schedule.timesteps, settings.cfg, settings.boundary,
                            settings.cfg_low_noise)
    cfg = handle.config
    tokens = shape[1] * shape[2] * shape[3] // 4
    if context is not None:
        tokens = min(tokens, context.latent()[0] * shape[2] * shape[3] // 4)
    dtype_bytes = torch.finfo(handle.dit.compute_dtype).bits // 8
    batched = {"on": True, "off": False}.get(settings.batched_cfg) if settings.batched_cfg != "auto" else \
        cfg_batch_fits(tokens, cfg.dim, cfg.ffn_dim, dtype_bytes, free_memory)
    stats.batched_cfg = batched and not math.isclose(settings.cfg, 1.0) and extras.audio is None
    batch = 1 if samples is None else samples.shape[0]
    zero_init = extras.guidance.zero_init_steps if extras.guidance is not None and extras.guidance.cfg_zero_star \
        else 0
    store = offload_device_for(extras.cache_args)
    placement = _Experts(device, force_offload)
    denoisers: dict[int, WanDenoiser] = {}

    def denoiser_for(model: WanModelHandle) -> WanDenoiser:
        if id(model) not in denoisers:
            cache = None
            if extras.cache_args is not None:
                cache = StepCache(extras.cache_args, model.config.dim, model.config.model_type,
                                  image.width * image.height, schedule.steps, store)
            denoisers[id(model)] = WanDenoiser(model, text, image, batched, device, context, feta, check_interrupt,
                                             stats, replace(extras, cache=cache))
        return denoisers[id(model)]

    states = _resume_states(resume, settings.scheduler, schedule.sigmas, start, batch) \
        if not settings.add_noise else None
    xs, solvers = [], []
    motion_gen = torch.Generator("cpu").manual_seed(int(settings.seed) ^ 0x40710)   # streaming motion frames
    for item in range(batch):
        noise = initial_noise(shape, settings.seed + item, context)
        sigma0 = schedule.sigmas[start]
        if samples is None:
            x = noise
        else:
            given = samples[item:item + 1].float()
            latent_in = normalize_latent(given)
            x = sigma0 * noise + (1.0 - sigma0) * latent_in if settings.add_noise else latent_in
            if states is not None and torch.equal(states[item].get("latent_out", given.new_empty(0)), given):
                x = states[item]["x"]      # the exact state, not its round trip through the raw convention
        x = hold_given(x.to(device), image, sigma0, motion_gen)
        solver = make_solver(settings.scheduler, schedule)
        solver.index = start
        if states is not None:
            solver.import_state(states[item]["solver"], device)
        generator = torch.Generator("cpu").manual_seed((int(settings.seed) + item) ^ 0x5EED)
        solver.noise = lambda like, g=generator: torch.randn(like.shape, generator=g).to(like.device, like.dtype)
        xs.append(x)
        solvers.append(solver)
    x0s: list[torch.Tensor | None] = [None] * batch
    try:
        with torch.no_grad():
            for i in range(start, end):
                high = plan is None or plan.uses_high(i)
                model = handle if high else low_noise
                more_after = plan is not None and high and any(not plan.uses_high(j) for j in range(i, end))
                placement.activate(model, more_after)
                stats.experts.append("high" if plan is not None and high else "low" if plan is not None else "single")
                step_cfg = cfg_list[i] if cfg_list is not None else plan.cfg(i) if plan is not None else settings.cfg
                denoise = denoiser_for(model)
                t = schedule.timesteps[i]
                for item in range(batch):
                    if check_interrupt is not None:
                        check_interrupt()
                    x = xs[item]
                    v = denoise(x, t, i, schedule.steps, step_cfg, item)
                    if i < zero_init:
                        v = torch.zeros_like(v)
                    x0s[item] = solvers[item].denoised(v, x)
                    xs[item] = hold_given(solvers[item].step(v, x), image, schedule.sigmas[i + 1], motion_gen)
                    _check_finite(xs[item], i, schedule.steps, model)
                    if preview is not None and item == 0:
                        preview(denormalize_latent(x0s[0].float()))
                    if progress is not None:
                        progress((i - start) * batch + item + 1, batch * (end - start))
    finally:
        placement.release()
        stats.swap = placement.swap
    for d in denoisers.values():
        if d.cache is not None:
            stats.cache_skipped += sum(d.cache.report.skipped.values())
            for branch, n in d.cache.report.skipped.items():
                stats.cache_by_branch[branch] = stats.cache_by_branch.get(branch, 0) + n
            log.info("%s (%s)", d.cache.report.summary(d.cache.args.method), d.name)
    raw = [denormalize_latent(x.float()).cpu() for x in xs]
    refs = image.ref_frames            # VACE reference frames only conditioned the video
    latent = torch.cat(raw)[:, :, refs:]
    denoised = torch.cat([denormalize_latent(x.float()).cpu() for x in x0s])[:, :, refs:]
    resume_out = None
    if end < schedule.steps:
        resume_out = {"scheduler": settings.scheduler, "sigmas": tuple(schedule.sigmas), "step": end,
                      "states": [{"solver": s.export_state(), "x": x.cpu(), "latent_out": r}
                                 for s, x, r in zip(solvers, xs, raw, strict=True)]}
    return SampleResult(latent, denoised, resume_out)


def offload_device_for(cache_args: CacheArgs | None) -> torch.device | None:
    """Where cached residuals wait between steps: None keeps them on the compute device."""
    if cache_args is None or cache_args.cache_device == "main_device":
        return None
    return torch.device("cpu")
