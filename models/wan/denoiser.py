"""One guided model evaluation of the Wan sampler: CFG (batched or as two passes), context windows,
FETA, Skip Layer Guidance, CFG-Zero*, RIFLEx and the step caches, all through the DiT's block hook.

With batched CFG both branches run as one batch and a step cache skips the batch only when both
branches may reuse their results; an active SLG runs the branches as two passes (it changes only the
negative one). Cache state is keyed by (branch, batch item, context window), so windows that move
between steps never reuse another window's residual; EasyCache decides once per step and latent
(batch item, window) and every branch follows that decision. Phantom with `subject_cfg` runs a third branch
(negative prompt with the subject frames, branch 2) and combines the three by
`guidance.phantom_combine`; the Fun reference frame (models/wan/fun.py) goes to every forward. With
speech-model audio the passes are those of models/wan/speech_guidance.py, each a batch-1 forward
with its own audio (a window's audio: the features of its frames).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .context import ContextOptions, WindowFuser, context_windows, window_weights
from .feta import FetaArgs, enhance_score
from .fun import for_model, reference_latent
from .guidance import GuidanceArgs, SLGArgs, combine, phantom_combine, riflex_cos_sin
from .nag import NagArgs, NagGuide
from .speech_guidance import combine_speech, guidance_passes, window_frames
from .step_cache import CacheArgs, StepCache
from .vace import empty_context

if TYPE_CHECKING:
    from .audio_hooks import AudioConditioning
    from .pipeline import RunStats, WanImageEmbeds, WanModelHandle, WanTextEmbeds


@dataclass(frozen=True)
class SamplingExtras:
    """Optional sampler features travelling together (caches, SLG, CFG-Zero*)."""

    cache_args: CacheArgs | None = None
    slg: SLGArgs | None = None
    guidance: GuidanceArgs | None = None
    cache: StepCache | None = None           # built per expert by the sampler
    nag: NagArgs | None = None               # Normalized Attention Guidance (models/wan/nag.py)
    audio: AudioConditioning | None = None   # speech-model features of the video's frames
    audio_cfg: float = 1.0                   # audio guidance scale (1: no audio-dropped pass)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] >= rows else torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])


def _prompt_for_window(window: Sequence[int], frames: int, prompts: int) -> int:
    """Which of several '|'-separated prompts a window uses: the section its last frame falls in."""
    section = frames / prompts
    return min(int(max(window) / section), prompts - 1)


class WanDenoiser:
    """Guided velocity for one latent (or its context windows) at one step; see the module docstring."""

    def __init__(self, handle: WanModelHandle, text: WanTextEmbeds, image: WanImageEmbeds,
                 batched: bool, device: torch.device, context: ContextOptions | None, feta: FetaArgs | None,
                 check_interrupt: Callable[[], None] | None, stats: RunStats, extras: SamplingExtras):
        self.dit = handle.dit
        self.name = handle.name
        self.batched = batched
        self.device = device
        self.context = context
        self.feta = feta
        self.check_interrupt = check_interrupt
        self.stats = stats
        self.slg = extras.slg
        self.zero_star = extras.guidance is not None and extras.guidance.cfg_zero_star
        self.cache: StepCache | None = extras.cache
        self.riflex = extras.guidance.riflex_freq_index if extras.guidance is not None else 0
        self._riflex_tables: dict = {}
        dtype = self.dit.compute_dtype
        image = for_model(handle.config, image)       # Wan 2.2 Fun Control: its mask channels in y
        reference = reference_latent(handle.config, image)   # Fun ref_conv models: one reference latent frame
        self.reference = None if reference is None else reference.to(device=device, dtype=torch.float32)
        self.subject_cfg = float(image.subject_cfg)
        if self.subject_cfg and self.zero_star:
            raise ValueError("CFG-Zero* and Phantom's subject_cfg do not combine: set subject_cfg to 0 on Wan Phantom "
                             "Subject Encode, or turn cfg_zero_star off in Wan Guidance Options.")
        self.prompts = [p.to(device=device, dtype=dtype) for p in text.positive]
        negative = text.negative if text.negative is not None else torch.zeros_like(text.positive[0][:1])
        self.negative = negative.to(device=device, dtype=dtype)
        self.nag = None if extras.nag is None else NagGuide(extras.nag, self.dit, self.negative)
        self.y = None if image.y is None else image.y.to(device=device, dtype=torch.float32)
        # Wan 2.2 TI2V: 0 where the latent is given (kept clean), per token timesteps in the DiT
        self.denoise_mask = None if image.denoise_mask is None else image.denoise_mask.to(device)[None]
        clip = image.clip
        if clip is None and handle.config.has_clip:   # Fun models without a start image (VideoX-Fun)
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
        self.audio = extras.audio
        self.audio_cfg = extras.audio_cfg

    def _block_runner(self, skip: frozenset[int] = frozenset(), rows: Sequence[tuple] = (), step: int = 0,
                      outcome: dict | None = None, nag=None):
        """The per-block hook: interrupt checks, RIFLEx, SLG's skipped blocks, and the token-level caches.

        `rows` names the cache state of each batch row ((branch, key) tuples). The cache decides at
        block 0 from the time modulation: when every row may reuse its residual the blocks are
        skipped; when only some may, the batch runs anyway and those rows count as computed."""
        check = self.check_interrupt
        cache = self.cache if self.cache is not None and self.cache.args.method != "easycache" else None
        cache = cache if rows else None
        riflex = self.riflex
        if check is None and not skip and cache is None and not riflex and nag is None:
            return None
        last = len(self.dit.blocks) - 1
        state = {"reuse": False, "start": None}

        def run(index, block, tokens, inputs):
            if check is not None:
                check()
            if riflex:
                inputs = self._riflex_inputs(inputs)
            if nag is not None:
                inputs = replace(inputs, nag=nag)
            if cache is not None and index == 0:
                decisions = [cache.skip_blocks(row, row[0], step, inputs.e0[i:i + 1]) for i, row in enumerate(rows)]
                state["start"] = tokens
                if all(decisions):
                    state["reuse"] = True
                    if outcome is not None:
                        outcome["reused"] = True
                    return tokens + torch.cat([cache.residual(row, tokens) for row in rows])
                for row, decided in zip(rows, decisions, strict=True):
                    if decided:
                        cache.revoke_skip(row, row[0])
            if state["reuse"] or index in skip:
                out = tokens
            else:
                out = block(tokens, inputs)
            if cache is not None and index == last and not state["reuse"]:
                residual = out - state["start"]
                for i, row in enumerate(rows):
                    cache.remember_residual(row, residual[i:i + 1])
            return out
        return run

    def _riflex_inputs(self, inputs):
        """The block inputs with RIFLEx's RoPE tables (built once per latent grid)."""
        grid = inputs.grid
        if grid not in self._riflex_tables:
            self._riflex_tables[grid] = riflex_cos_sin(grid, self.dit.config.rope_axes, self.riflex,
                                                       inputs.rope_cos.device)
        cos, sin = self._riflex_tables[grid]
        return replace(inputs, rope_cos=cos, rope_sin=sin)

    def _scale(self, feta_on: bool):
        if not feta_on:
            return None
        weight = self.feta.weight

        def scale(q, k, grid):
            if grid[0] < 2:
                return 1.0
            return enhance_score(q, k, grid[0], weight).view(-1, 1, 1)
        return scale

    def _forward(self, x, t, context, clip, y, feta_on, runner, vace=None, mask=None, audio=None):
        self.stats.forwards += 1
        timestep = torch.full((x.shape[0],), float(t), device=self.device)
        extra = {} if vace is None else {"vace_context": [c[None].expand(x.shape[0], *c.shape) for c in vace],
                                         "vace_strength": self.vace_strengths}
        if self.reference is not None:
            extra["reference"] = self.reference[None].expand(x.shape[0], *self.reference.shape)
        if audio is not None:
            extra["audio"] = audio
        return self.dit(x, timestep, context, clip, y, block_runner=runner, self_attn_scale=self._scale(feta_on),
                        denoise_mask=mask, **extra)

    def _with_subject(self, x, positive: bool):
        """Phantom: the subject latents after the video's frames (zeros for the negative pass)."""
        if self.subject is None:
            return x
        subject = self.subject if positive else torch.zeros_like(self.subject)
        return torch.cat([x, subject[None].expand(x.shape[0], *subject.shape)], dim=2)

    def _rows(self, x, t, context, clip, y, feta_on, rows, step, skip=frozenset(), vace=None, mask=None,
              audio=None):
        """One forward of the CFG rows `rows` ((branch, key) each, batched in that order) for the
        latent x [1, ...], through the cache when there is one. Phantom's subject frames join the
        model input (zeros for the negative branch) and are cut off its prediction."""
        frames = x.shape[2]
        cache = self.cache
        easy = cache is not None and cache.args.method == "easycache"
        if easy:
            reused = [cache.skip_forward(row, row[0], step, x, group=row[1]) for row in rows]
            if all(v is not None for v in reused):
                return torch.cat(reused)
            for row, v in zip(rows, reused, strict=True):
                if v is not None:
                    cache.revoke_skip(row, row[0])
        outcome = {"reused": False}
        batch = torch.cat([self._with_subject(x, row[0] != 1) for row in rows])   # branch 1: no subject
        nag = None if self.nag is None else self.nag.for_rows([row[0] for row in rows], self.device)
        v = self._forward(batch, t, context, clip, y, feta_on,
                          self._block_runner(skip, rows if cache is not None else (), step, outcome, nag),
                          vace, mask, audio)[:, :, :frames]
        if not outcome["reused"]:
            self.stats.branches_computed += len(rows)
        if easy:
            for i, row in enumerate(rows):
                cache.remember_output(row, x, v[i:i + 1], group=row[1])
        return v

    def _phantom(self, x, t, prompt, y, feta_on, cfg, step, steps, key, slg_on):
        """Phantom's three branches (prompt + subjects, negative + subjects, negative alone; rows 0, 2
        and 1, so the cache and SLG treat row 1 as the negative), combined by `phantom_combine`."""
        rows = [(0, key), (2, key), (1, key)]
        if self.batched and not slg_on:
            n = max(prompt.shape[0], self.negative.shape[0])
            neg = _pad_rows(self.negative, n)
            context = torch.stack([_pad_rows(prompt, n), neg, neg])
            clip = None if self.clip is None else torch.cat([self.clip, self.negative_clip, self.negative_clip])
            yy = None if y is None else torch.cat([y, y, y])
            branches = self._rows(x, t, context, clip, yy, feta_on, rows, step).chunk(3)
        else:
            skip = frozenset(self.slg.blocks) if slg_on else frozenset()
            branches = [self._rows(x, t, (prompt if row[0] == 0 else self.negative)[None],
                                   self.clip if row[0] == 0 else self.negative_clip, y, feta_on, [row], step,
                                   skip if row[0] == 1 else frozenset()) for row in rows]
        return phantom_combine(*branches, cfg, self.subject_cfg)

    def _cfg(self, x, t, prompt, y, feta_on, cfg, step, steps, key, vace=None, mask=None, audio=None):
        """Guided velocity for one (window of the) latent [1, C, T, h, w]."""
        if audio is not None:
            return self._speech_cfg(x, t, prompt, y, feta_on, cfg, step, steps, key, vace, mask, audio)
        if self.subject_cfg:
            slg_on = self.slg is not None and self.slg.active_at(step, steps)
            return self._phantom(x, t, prompt, y, feta_on, cfg, step, steps, key, slg_on)
        if math.isclose(cfg, 1.0):
            return self._rows(x, t, prompt[None], self.clip, y, feta_on, [(0, key)], step, vace=vace, mask=mask)
        slg_on = self.slg is not None and self.slg.active_at(step, steps)
        if self.batched and not slg_on:
            rows = max(prompt.shape[0], self.negative.shape[0])
            context = torch.stack([_pad_rows(prompt, rows), _pad_rows(self.negative, rows)])
            clip = None if self.clip is None else torch.cat([self.clip, self.negative_clip])
            yy = None if y is None else torch.cat([y, y])
            cond, uncond = self._rows(x, t, context, clip, yy, feta_on, [(0, key), (1, key)], step,
                                      vace=vace, mask=mask).chunk(2)
        else:
            skip = frozenset(self.slg.blocks) if slg_on else frozenset()
            cond = self._rows(x, t, prompt[None], self.clip, y, feta_on, [(0, key)], step, vace=vace, mask=mask)
            uncond = self._rows(x, t, self.negative[None], self.negative_clip, y, feta_on, [(1, key)], step, skip,
                                vace=vace, mask=mask)
        return combine(cond, uncond, cfg, self.zero_star)

    def _speech_cfg(self, x, t, prompt, y, feta_on, cfg, step, steps, key, vace, mask, audio):
        """Text and audio guidance of a speech model: its family's passes, one forward each (the
        negative-prompt passes are the ones SLG weakens; cache rows: 0 positive, 1 negative prompt)."""
        passes = guidance_passes(audio.family, cfg, self.audio_cfg)
        slg_on = self.slg is not None and self.slg.active_at(step, steps)
        null = audio.null() if any(not p.audio for p in passes) else None
        preds = []
        for index, p in enumerate(passes):
            context, clip = (prompt[None], self.clip) if p.text else (self.negative[None], self.negative_clip)
            skip = frozenset(self.slg.blocks) if slg_on and not p.text else frozenset()
            row = (0 if p.text else 1, key, "audio pass", index)   # one EasyCache decision for all passes
            preds.append(self._rows(x, t, context, clip, y, feta_on, [row], step, skip, vace, mask,
                                    audio if p.audio else null))
        return combine_speech(audio.family, preds, cfg, self.audio_cfg, self.zero_star)

    def __call__(self, x: torch.Tensor, t: float, step: int, steps: int, cfg: float, item: int = 0) -> torch.Tensor:
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
            return self._cfg(x, t, self.prompts[0], y, feta_on, cfg, step, steps, (item,), self.vace,
                             self.denoise_mask, self.audio)
        self.stats.windows_per_step.append(len(windows))
        fuser = WindowFuser(x, frame_dim=2)
        looped = self.context.schedule == "uniform_looped"
        for window in windows:
            weights = window_weights(window, frames, overlap, self.context.fuse_method, looped)
            prompt = self.prompts[_prompt_for_window(window, frames, len(self.prompts))]
            key = (item, *window)
            audio = None if self.audio is None else self.audio.frames(*window_frames(window))
            if refs:
                window, weights = list(range(refs)) + [refs + i for i in window], torch.cat([torch.ones(refs), weights])
            idx = torch.tensor(window, device=x.device)
            yw = None
            if y is not None:
                yw = y.index_select(2, idx).clone()
                yw[:, :, :1] = y[:, :, :1]   # every window is conditioned on the start image
            vace = None if self.vace is None else self.vace.index_select(2, idx)
            mask = None if self.denoise_mask is None else self.denoise_mask.index_select(2, idx)
            pred = self._cfg(x.index_select(2, idx), t, prompt, yw, feta_on, cfg, step, steps, key, vace, mask,
                             audio)
            fuser.add(window, pred, weights)
        return fuser.result()
