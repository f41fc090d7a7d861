"""Wan 2.1 text/image-to-video sampling: noise, solver loop, CFG, context windows, FETA, block swap.

    latent = sample_video(handle, text, image, SamplerSettings(steps=30, cfg=6.0, shift=5.0, seed=1),
                          device=torch.device("cuda"), progress=bar.update_absolute, check_interrupt=check)

Values crossing node boundaries are small frozen dataclasses (`WanModelHandle`, `WanTextEmbeds`,
`WanImageEmbeds`) or raw latents: latents on the wire use ComfyUI's convention (the VAE's raw
output); normalisation to the DiT's statistics happens here, inside, and nowhere else.

Per step the DiT sees the latent once per context window; CFG runs cond and uncond as one batch
of two when memory allows (so a swapped block crosses the bus once per step, not twice), else
as two passes. `check_interrupt` runs before every step and every block, so a stop request takes
effect within one block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ...kernels.blockswap import HostBlocks, SwapSession, default_transport, swap_indices
from .context import ContextOptions, WindowFuser, context_windows, freenoise, window_weights
from .dit import WanDiT
from .feta import FetaArgs, enhance_score
from .sampling import SOLVERS, make_schedule, make_solver
from .vace import VaceInput, check_chain, empty_context
from .vae import denormalize_latent, normalize_latent

log = logging.getLogger("slipstream.wan")

SIZE_MULTIPLE = 16       # pixels: 8 for the VAE × 2 for the DiT's patch
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
    vace: tuple[VaceInput, ...] = ()
    subject: torch.Tensor | None = None

    @property
    def ref_frames(self) -> int:
        """Latent frames in front of the video that only condition it (VACE reference images)."""
        return self.vace[0].ref_frames if self.vace else 0

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (LATENT_CHANNELS, (self.num_frames - 1) // 4 + 1 + self.ref_frames, self.height // 8, self.width // 8)


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 30
    cfg: float = 6.0
    shift: float = 5.0
    seed: int = 0
    scheduler: str = "unipc"
    denoise: float = 1.0
    batched_cfg: str = "auto"   # "auto" | "on" | "off"

    def __post_init__(self):
        if self.scheduler not in SOLVERS:
            raise ValueError(f"Unknown scheduler '{self.scheduler}'. Valid choices: {', '.join(SOLVERS)}.")
        if self.batched_cfg not in ("auto", "on", "off"):
            raise ValueError(f"batched_cfg must be auto, on or off, got '{self.batched_cfg}'")


@dataclass
class RunStats:
    """What a sampling run did (for logs and tests)."""

    forwards: int = 0
    batched_cfg: bool = False
    windows_per_step: list[int] = field(default_factory=list)
    swap: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- sizes


def round_video_size(width: int, height: int, num_frames: int) -> tuple[int, int, int, str | None]:
    """Round to what Wan can make (sides multiples of 16, 1+4k frames); the note says what changed."""
    def nearest(value: float) -> int:  # halves round up (Python's round() would go to even)
        return int(math.floor(value + 0.5))

    w = max(SIZE_MULTIPLE, nearest(width / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    h = max(SIZE_MULTIPLE, nearest(height / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    f = 1 + 4 * max(0, nearest((num_frames - 1) / 4))
    changes = []
    if (w, h) != (width, height):
        changes.append(f"size {width}x{height} -> {w}x{h} (multiples of {SIZE_MULTIPLE})")
    if f != num_frames:
        changes.append(f"{num_frames} frames -> {f} (Wan makes 1+4k frames)")
    return w, h, f, ("Wan: rounded " + "; ".join(changes)) if changes else None


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
    session = None
    try:
        if host is None:
            dit.to(device)
        else:
            host.move_rest(dit, device)
            units, _ = swap_units(dit, handle.swap)
            transport = default_transport(device, non_blocking=handle.swap.use_non_blocking)
            session = SwapSession(host, units, transport, prefetch=handle.swap.prefetch_blocks, root=dit)
            session.__enter__()
        yield session
    finally:
        if session is not None:
            session.__exit__(None, None, None)
        if force_offload and device != handle.resident_device:
            if host is None:
                dit.to(handle.resident_device)
            else:
                host.move_rest(dit, handle.resident_device)


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
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = settings.dynamo_recompile_limit
    kwargs = {"backend": settings.backend, "fullgraph": settings.fullgraph, "dynamic": settings.dynamic}
    if settings.backend == "inductor":
        kwargs["mode"] = settings.mode
    targets = list(dit.blocks) + list(getattr(dit, "vace_blocks", ())) if settings.blocks_only else [dit]
    for module in targets:
        module.compile(**kwargs)


# ---------------------------------------------------------------------------------- sampling


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] >= rows else torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])


def _prompt_for_window(window: Sequence[int], frames: int, prompts: int) -> int:
    """Which of several '|'-separated prompts a window uses: the section its last frame falls in."""
    section = frames / prompts
    return min(int(max(window) / section), prompts - 1)


class _Denoiser:
    """One model evaluation with CFG (batched or not), context windows and FETA."""

    def __init__(self, handle: WanModelHandle, text: WanTextEmbeds, image: WanImageEmbeds, cfg: float,
                 batched: bool, device: torch.device, context: ContextOptions | None, feta: FetaArgs | None,
                 check_interrupt: Callable[[], None] | None, stats: RunStats):
        self.dit = handle.dit
        self.cfg = cfg
        self.use_uncond = not math.isclose(cfg, 1.0)
        self.batched = batched and self.use_uncond
        self.device = device
        self.context = context
        self.feta = feta
        self.check_interrupt = check_interrupt
        self.stats = stats
        dtype = self.dit.compute_dtype
        self.prompts = [p.to(device=device, dtype=dtype) for p in text.positive]
        negative = text.negative if text.negative is not None else torch.zeros_like(text.positive[0][:1])
        self.negative = negative.to(device=device, dtype=dtype)
        self.y = None if image.y is None else image.y.to(device=device, dtype=torch.float32)
        clip = image.clip
        if clip is None and handle.config.has_image_input:   # Fun models without a start image (VideoX-Fun)
            clip = torch.zeros(1, handle.config.clip_tokens, handle.config.clip_dim)
        self.clip = None if clip is None else clip.to(device=device, dtype=dtype)
        neg_clip = image.negative_clip if image.negative_clip is not None else clip
        self.negative_clip = None if neg_clip is None else neg_clip.to(device=device, dtype=dtype)
        self.vace = None              # [N, 96, T, h, w] VACE contexts (VACE models only) and their strengths
        self.subject = None if image.subject is None else image.subject.to(device=device, dtype=torch.float32)
        if handle.config.is_vace:
            inputs = image.vace or (empty_context(image.latent_shape),)
            self.vace = torch.stack([v.context for v in inputs]).to(device=device, dtype=torch.float32)
            self.vace_strengths = [v.strength for v in inputs]
        self.ref_frames = image.ref_frames

    def _block_runner(self):
        check = self.check_interrupt
        if check is None:
            return None

        def run(index, block, tokens, inputs):
            check()
            return block(tokens, inputs)
        return run

    def _scale(self, feta_on: bool):
        if not feta_on:
            return None
        weight = self.feta.weight

        def scale(q, k, grid):
            if grid[0] < 2:
                return 1.0
            return enhance_score(q, k, grid[0], weight).view(-1, 1, 1)
        return scale

    def _forward(self, x, t, context, clip, y, feta_on, vace=None):
        self.stats.forwards += 1
        timestep = torch.full((x.shape[0],), float(t), device=self.device)
        extra = {} if vace is None else {"vace_context": [c[None].expand(x.shape[0], *c.shape) for c in vace],
                                         "vace_strength": self.vace_strengths}
        return self.dit(x, timestep, context, clip, y, block_runner=self._block_runner(),
                        self_attn_scale=self._scale(feta_on), **extra)

    def _with_subject(self, x, positive: bool):
        """Phantom: the subject latents after the video's frames (zeros for the negative pass)."""
        if self.subject is None:
            return x
        subject = self.subject if positive else torch.zeros_like(self.subject)
        return torch.cat([x, subject[None].expand(x.shape[0], *subject.shape)], dim=2)

    def _cfg(self, x, t, prompt, y, feta_on, vace=None):
        """Guided velocity for one (window of the) latent [1, 16, T, h, w]."""
        frames = x.shape[2]
        if not self.use_uncond:
            return self._forward(self._with_subject(x, True), t, prompt[None], self.clip, y, feta_on, vace)[:, :, :frames]
        if self.batched:
            rows = max(prompt.shape[0], self.negative.shape[0])
            context = torch.stack([_pad_rows(prompt, rows), _pad_rows(self.negative, rows)])
            clip = None if self.clip is None else torch.cat([self.clip, self.negative_clip])
            yy = None if y is None else torch.cat([y, y])
            xx = torch.cat([self._with_subject(x, True), self._with_subject(x, False)])
            cond, uncond = self._forward(xx, t, context, clip, yy, feta_on, vace).chunk(2)
        else:
            cond = self._forward(self._with_subject(x, True), t, prompt[None], self.clip, y, feta_on, vace)
            uncond = self._forward(self._with_subject(x, False), t, self.negative[None], self.negative_clip, y,
                                   feta_on, vace)
        return (uncond + self.cfg * (cond - uncond))[:, :, :frames]

    def __call__(self, x: torch.Tensor, t: float, step: int, steps: int) -> torch.Tensor:
        feta_on = self.feta is not None and self.feta.active_at(step, steps)
        y = None if self.y is None else self.y[None]
        refs = self.ref_frames                # VACE reference frames: part of every window, not windowed
        frames = x.shape[2] - refs
        windows = None
        if self.context is not None:
            size, stride, overlap = self.context.latent()
            if frames > size:
                windows = context_windows(self.context.schedule, step, frames, size, stride, overlap)
        if windows is None:
            self.stats.windows_per_step.append(1)
            return self._cfg(x, t, self.prompts[0], y, feta_on, self.vace)
        self.stats.windows_per_step.append(len(windows))
        fuser = WindowFuser(x, frame_dim=2)
        looped = self.context.schedule == "uniform_looped"
        for window in windows:
            weights = window_weights(window, frames, overlap, self.context.fuse_method, looped)
            prompt = self.prompts[_prompt_for_window(window, frames, len(self.prompts))]
            if refs:
                window, weights = list(range(refs)) + [refs + i for i in window], torch.cat([torch.ones(refs), weights])
            idx = torch.tensor(window, device=x.device)
            yw = None
            if y is not None:
                yw = y.index_select(2, idx).clone()
                yw[:, :, :1] = y[:, :, :1]   # every window is conditioned on the start image
            vace = None if self.vace is None else self.vace.index_select(2, idx)
            pred = self._cfg(x.index_select(2, idx), t, prompt, yw, feta_on, vace)
            fuser.add(window, pred, weights)
        return fuser.result()


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
    if not text.positive:
        raise ValueError("The text embeds hold no positive prompt.")
    width = text.positive[0].shape[-1]
    if width != cfg.text_dim:
        raise ValueError(f"The text embeds are {width} wide but {handle.name} expects {cfg.text_dim} "
                         "(umT5-XXL): use the text encoder that belongs to this model.")
    if cfg.has_image_input and image.y is None:
        raise ValueError(f"{handle.name} is an image-to-video model: connect Wan Image to Video Encode (with a "
                         "start image and CLIP vision embeds) instead of Wan Empty Embeds.")
    if not cfg.has_image_input and image.y is not None:
        raise ValueError(f"{handle.name} is a text-to-video model but the image embeds carry a start image; "
                         "load an image-to-video (i2v) model, or use Wan Empty Embeds.")
    if cfg.has_image_input and image.y.shape[0] != cfg.cond_channels:
        raise ValueError(f"The image embeds carry {image.y.shape[0]} conditioning channels but {handle.name} takes "
                         f"{cfg.cond_channels}: use Wan Fun Control Encode for Fun Control models (in_dim 48) and "
                         "Wan Image to Video Encode for I2V and Fun InP models (in_dim 36).")
    if image.subject is not None and (image.vace or cfg.has_image_input):
        raise ValueError("Phantom subject images go with a text-to-video (Phantom) model and no other conditioning: "
                         "load the Phantom checkpoint and connect Wan Phantom Subject Encode alone.")
    if image.vace and not cfg.is_vace:
        raise ValueError(f"The image embeds carry a VACE control input but {handle.name} is not a VACE model: "
                         "load a Wan VACE checkpoint (e.g. wan2.1_vace_14B), or use Wan Empty Embeds.")
    check_chain(image.vace)
    if image.clip is not None and image.clip.shape[-1] != cfg.clip_dim:
        raise ValueError(f"The CLIP embeds are {image.clip.shape[-1]} wide but {handle.name} expects {cfg.clip_dim}.")
    shape = image.latent_shape
    if samples is not None:
        if samples.dim() != 5 or tuple(samples.shape[1:]) != shape:
            raise ValueError(f"The samples latent {tuple(samples.shape)} does not match the size the embeds ask "
                             f"for ({image.width}x{image.height}, {image.num_frames} frames → [B, {', '.join(map(str, shape))}]).")
    elif settings.denoise < 1.0:
        raise ValueError("denoise below 1.0 needs a latent to start from: connect 'samples' (or set denoise to 1.0).")


def sample_video(handle: WanModelHandle, text: WanTextEmbeds, image: WanImageEmbeds, settings: SamplerSettings,
                 *, device: torch.device, samples: torch.Tensor | None = None,
                 context: ContextOptions | None = None, feta: FetaArgs | None = None, force_offload: bool = True,
                 free_memory: int | None = None, progress: Callable[[int, int], None] | None = None,
                 check_interrupt: Callable[[], None] | None = None,
                 stats: RunStats | None = None) -> torch.Tensor:
    """Generate a raw video latent [B, 16, T, h, w] (float32, CPU). `samples` (raw, optional) is the
    latent to start from (vid2vid, with denoise < 1); batch items are sampled one after another."""
    check_inputs(handle, text, image, samples, settings)
    stats = stats if stats is not None else RunStats()
    shape = image.latent_shape
    schedule = make_schedule(settings.scheduler, settings.steps, settings.shift, settings.denoise)
    cfg = handle.config
    tokens = shape[1] * shape[2] * shape[3] // 4
    if context is not None:
        tokens = min(tokens, context.latent()[0] * shape[2] * shape[3] // 4)
    dtype_bytes = torch.finfo(handle.dit.compute_dtype).bits // 8
    batched = {"on": True, "off": False}.get(settings.batched_cfg) if settings.batched_cfg != "auto" else \
        cfg_batch_fits(tokens, cfg.dim, cfg.ffn_dim, dtype_bytes, free_memory)
    stats.batched_cfg = batched and not math.isclose(settings.cfg, 1.0)
    batch = 1 if samples is None else samples.shape[0]
    outputs = []
    with torch.no_grad(), model_on_device(handle, device, force_offload) as session:
        denoise = _Denoiser(handle, text, image, settings.cfg, batched, device, context, feta, check_interrupt, stats)
        for item in range(batch):
            noise = initial_noise(shape, settings.seed + item, context)
            x = noise
            if samples is not None:
                start = normalize_latent(samples[item:item + 1].float())
                sigma0 = schedule.sigmas[0]
                x = sigma0 * noise + (1.0 - sigma0) * start
            x = x.to(device)
            solver = make_solver(settings.scheduler, schedule)
            for i, t in enumerate(schedule.timesteps):
                if check_interrupt is not None:
                    check_interrupt()
                v = denoise(x, t, i, schedule.steps)
                x = solver.step(v, x)
                if progress is not None:
                    progress(item * schedule.steps + i + 1, batch * schedule.steps)
            outputs.append(denormalize_latent(x.float()).cpu())
        if session is not None:
            stats.swap = session.stats()
    return torch.cat(outputs)[:, :, image.ref_frames:]   # VACE reference frames only conditioned the video
