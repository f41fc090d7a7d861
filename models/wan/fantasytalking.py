"""FantasyTalking on the Wan DiT: speech-driven portrait video from one image and an audio track.

    adapter = FantasyTalkingAdapter.from_file("fantasytalking_model.ckpt", dit)   # or from_state_dict
    dit.attach_audio(adapter)
    cond = FantasyTalkingConditioning(features, num_frames=81, fps=23, audio_scale=1.0)
    v = dit(x, t, context, clip_fea, y, audio=cond)

What the model adds (official names, so the file's keys are the DiT's own module names):
  * `proj_model`: Linear(768 -> 2048, no bias) + LayerNorm(2048), applied to the wav2vec2-base-960h
    last hidden state of the whole audio [1, L, 768]. It lives on the adapter (compute device, fp32:
    1.6 M weights, run in fp32 as the official code does).
  * per block `blocks.N.cross_attn.processor.{k_proj,v_proj}` (Linear 2048 -> dim, no bias): keys and
    values of the audio tokens. They become `CastLinear`s inside `dit.blocks[N].cross_attn`, so
    block swap moves them with their block and int8/fp8 storage and LoRA reach them.

The audio attention (added inside the image-text cross-attention, before its `o`): the cross-
attention's q is regrouped per latent frame ([B, F·h·w, H, D] -> [B·F, h·w, H, D]), each latent frame
attends to the keys/values of its own audio window, and the result times `audio_scale` is added to
the text + image attention output. Padding inside a window is masked out (the official flash-attention
call's `k_lens`).

Audio windows (the official `split_audio_sequence` + `split_tensor_with_padding`, expand 4): with L
audio tokens for N video frames, tpf = L / N tokens per frame and half = int(2·tpf). Latent frame
i >= 1 covers video frames 4(i-1)+1 .. 4i and is centred on c_i = int(tpf·(8i-2)/2) - 1; its window
is tokens [c_i - half - 4, c_i + half + 4] (both ends included). Latent frame 0 (the lone first video
frame) takes the window that ends where window 1 starts: [c_1 - 3·half - 4, c_1 - half + 4]. Token
indices outside [0, L) are padding: the valid tokens come first in the window, zeros after, and only
`k_len` (the valid count) are attended. A window with no valid token at all adds nothing.

Slices (`FantasyTalkingConditioning.frames(start, count)`, streaming clips and context windows)
keep the whole feature sequence and its tokens-per-frame and shift the video timeline: the slice's
frame j is video frame start + j, so its latent frame i >= 1 is centred at c_i = int(tpf·(start +
4i - 1)) - 1 and its latent frame 0 follows the first-window rule relative to that. With start = 0
this is the official split exactly; for start > 0 the first window holds the real audio just before
the clip's second latent frame instead of padding.

Audio guidance (official multi-guidance): the no-audio branch is the same call with audio_scale 0
(`null()`): no audio term at all, the plain DiT. See `FantasyTalkingConditioning`.

Which Wan: FantasyTalking is trained on Wan 2.1 I2V 14B 720P only. Other Wan models are refused with
what to load. Full-size rules (the 14B I2V shape: dim 5120, 40 blocks, 36 input channels, CLIP
branch) apply when the DiT is at least 1536 wide (the 1.3B width); a narrower DiT (test models)
needs only the file's shapes to match it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import attention
from ...kernels.cast_linear import CastLinear
from ..checkpoint import PICKLE_EXTS, CheckpointError, check_state_dict, load_state_dict
from .audio_hooks import AudioAdapter, AudioConditioning

FAMILY = "fantasytalking"
EXPAND_TOKENS = 4              # official `expand_length`: tokens added on both sides of every window
FULL_SIZE_MIN_DIM = 1536       # the 1.3B width: from here on a DiT must be the real I2V-14B
DEFAULT_FPS = 23.0             # the official inference frame rate
AUDIO_IN_DIM = 768             # wav2vec2-base-960h hidden width
PROJ_PREFIX = "proj_model."
PROC_PREFIX = "audio_processor."
_PROC_KEY = "blocks.{}.cross_attn.processor.{}_proj.weight"
_WHAT_TO_LOAD = "Wan2.1-I2V-14B-720P (e.g. wan2.1_i2v_720p_14B_bf16.safetensors)"


# ------------------------------------------------------------------------------------------- file layout
def flat_state_dict(sd: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The file's tensors under flat keys: the .ckpt's nested {"proj_model": {...}, "audio_processor":
    {...}} becomes "proj_model.*" / "audio_processor.*", as the official safetensors layout names them."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{inner}": t for inner, t in value.items()})
        else:
            flat[key] = value
    return flat


def is_fantasytalking_file(keys: Collection[str]) -> bool:
    """True for a FantasyTalking file: the projector's weight and per-block audio processors (flat
    keys), or the .ckpt's two top-level tables."""
    keys = set(keys)
    if {"proj_model", "audio_processor"} <= keys:
        return True
    return PROJ_PREFIX + "proj.weight" in keys and any(
        k.startswith(PROC_PREFIX + "blocks.") and ".cross_attn.processor." in k for k in keys)


def _refuse_other_files(keys: Collection[str], what: str) -> None:
    """Name the file a user gave by mistake (a MultiTalk or Wan DiT file) and what to do instead."""
    if any(k.startswith("audio_proj.") or ".audio_cross_attn." in k for k in keys):
        raise CheckpointError(f"{what} is a MultiTalk / InfiniteTalk model, not FantasyTalking: load it as a "
                              "MultiTalk speech model and encode the audio with the MultiTalk embeds node.")
    if any(k in keys for k in ("patch_embedding.weight", "head.modulation")) or \
            any(k.endswith((".patch_embedding.weight", ".head.modulation")) for k in keys):
        raise CheckpointError(f"{what} is a Wan diffusion model, not a FantasyTalking file: load it with the Wan "
                              "model loader and give fantasytalking_model.ckpt as the speech model.")
    if not is_fantasytalking_file(keys):
        sample = ", ".join(sorted(keys)[:4]) or "no tensors"
        raise CheckpointError(f"{what} is not a FantasyTalking file (no proj_model.proj.weight and "
                              f"audio_processor.blocks.N.cross_attn.processor.* tensors; it holds {sample}). "
                              "Download fantasytalking_model.ckpt from the FantasyTalking release.")


def expected_shapes(dim: int, num_layers: int, proj_dim: int = 2048,
                    audio_dim: int = AUDIO_IN_DIM) -> dict[str, tuple[int, ...]]:
    """Flat key -> shape of every tensor a FantasyTalking file for a `dim`-wide, `num_layers` DiT holds."""
    shapes = {PROJ_PREFIX + "proj.weight": (proj_dim, audio_dim), PROJ_PREFIX + "norm.weight": (proj_dim,),
              PROJ_PREFIX + "norm.bias": (proj_dim,)}
    for i in range(num_layers):
        for kv in ("k", "v"):
            shapes[PROC_PREFIX + _PROC_KEY.format(i, kv)] = (dim, proj_dim)
    return shapes


# ------------------------------------------------------------------------------------------- which Wan
def check_dit_config(config, what: str = "FantasyTalking") -> None:
    """Refuse a DiT FantasyTalking was not trained on (see the module docstring), saying what to load."""
    name = getattr(config, "name", "this model")
    kind = {"t2v": "a text-to-video model", "flf2v": "a first/last-frame model",
            "ti2v": "a Wan 2.2 TI2V model"}.get(config.model_type)
    if config.is_vace:
        kind = "a VACE model"
    elif config.generation != "2.1":
        kind = f"a Wan {config.generation} model"
    elif config.model_type == "i2v" and not config.has_clip:
        kind = "an image-to-video model without the CLIP image branch"
    if kind is None and config.dim >= FULL_SIZE_MIN_DIM and \
            (config.dim, config.num_layers, config.in_dim) != (5120, 40, 36):
        size = "the 1.3B size" if config.dim == 1536 else f"a {config.dim}-wide, {config.num_layers}-block model"
        kind = f"{size}{' with ' + str(config.in_dim) + ' input channels' if config.in_dim != 36 else ''}"
    if kind is not None:
        raise CheckpointError(f"{what} is trained on Wan 2.1 I2V 14B 720P (image-to-video, 14B) only, but the Wan "
                              f"model loaded is {name}, {kind}. Load {_WHAT_TO_LOAD} as the Wan model.")


# ------------------------------------------------------------------------------------------- windows
def audio_windows(tokens: int, total_frames: int, first_frame: int, latent_frames: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(first valid token [F], valid count k_len [F], window width W) of every latent frame's audio
    window (rules in the module docstring). Integer arithmetic except tokens-per-frame, as official."""
    tpf = tokens / total_frames
    half = int(tpf * 4 / 2)
    s = first_frame

    def centre(i: int) -> int:
        return int((tpf * (s + (i - 1) * 4 + 1) + tpf * (s + i * 4 + 1)) / 2) - 1

    ranges = [(centre(i) - half, centre(i) + half) for i in range(1, max(latent_frames, 2))]
    first_end = ranges[0][0]
    ranges = [(-(half * 2 - first_end), first_end)] + ranges
    starts, lens = [], []
    for start, end in ranges[:latent_frames]:
        start, end = start - EXPAND_TOKENS, end + EXPAND_TOKENS
        valid_start, valid_end = max(start, 0), min(end, tokens - 1)
        starts.append(valid_start)
        lens.append(max(0, valid_end - valid_start + 1))
    return torch.tensor(starts), torch.tensor(lens), 2 * half + 2 * EXPAND_TOKENS + 1


def gather_windows(tokens: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, width: int) -> torch.Tensor:
    """[L, C] tokens -> [F, W, C] windows: each window's valid tokens first, zeros after (official padding)."""
    pos = torch.arange(width, device=tokens.device)
    idx = starts.to(tokens.device)[:, None] + pos                               # [F, W]
    keep = pos < lens.to(tokens.device)[:, None]
    picked = tokens[idx.clamp(0, tokens.shape[0] - 1)]
    return picked * keep[..., None].to(picked.dtype)


# ------------------------------------------------------------------------------------------- conditioning
@dataclass(frozen=True, eq=False)
class FantasyTalkingConditioning:
    """Speech features of one speaker for a run of video frames (an `AudioConditioning`).

    `features` [1, L, 768]: the wav2vec2 last hidden state of the audio covering the video (raw, not yet
    projected; fp32). `num_frames`: video frames this conditioning covers (the latent has
    (num_frames - 1) // 4 + 1 frames). `fps`: the video frame rate the features were cut for (the
    official default is 23; the windows need only L / total_frames). `audio_scale`: the strength of
    the audio term (official default 1.0; 0 is the no-audio branch). `first_frame` / `total_frames`:
    where frame 0 sits on the features' timeline and how many video frames the whole sequence spans
    (set by `frames`; total_frames defaults to num_frames).

    Silent audio is valid input: it is encoded like any other sound and drives a closed, still mouth;
    it is not the no-audio branch (that is `null()`).
    """

    features: torch.Tensor
    num_frames: int
    fps: float = DEFAULT_FPS
    audio_scale: float = 1.0
    first_frame: int = 0
    total_frames: int = 0

    family: ClassVar[str] = FAMILY

    def __post_init__(self) -> None:
        f = self.features
        if not isinstance(f, torch.Tensor) or f.dim() != 3 or f.shape[0] != 1 or f.shape[1] < 1:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"FantasyTalking audio features must be [1, L, {AUDIO_IN_DIM}] (wav2vec2 last hidden "
                             f"state of one speaker), got {shape}")
        if not f.is_floating_point() or not bool(torch.isfinite(f).all()):
            raise ValueError("FantasyTalking audio features must be finite floats; encode the audio again.")
        if int(self.num_frames) < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a positive frame rate, got {self.fps}")
        if not math.isfinite(self.audio_scale):
            raise ValueError(f"audio_scale must be a finite number, got {self.audio_scale}")
        if self.first_frame < 0:
            raise ValueError(f"first_frame must be >= 0, got {self.first_frame}")
        if self.total_frames <= 0:
            object.__setattr__(self, "total_frames", int(self.num_frames))

    @property
    def latent_frames(self) -> int:
        return (int(self.num_frames) - 1) // 4 + 1

    def null(self) -> FantasyTalkingConditioning:
        """The official no-audio branch: the same features with audio_scale 0 (no audio term)."""
        return replace(self, audio_scale=0.0)

    def frames(self, start: int, count: int) -> FantasyTalkingConditioning:
        """Video frames [start, start + count): same features, timeline shifted (module docstring)."""
        if start < 0 or count < 1:
            raise ValueError(f"frames(start, count) needs start >= 0 and count >= 1, got ({start}, {count})")
        return replace(self, first_frame=self.first_frame + int(start), num_frames=int(count))

    def windows(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(first token, k_len, width) of every latent frame's audio window (see `audio_windows`)."""
        return audio_windows(self.features.shape[1], self.total_frames, self.first_frame, self.latent_frames)


# ------------------------------------------------------------------------------------------- modules
class AudioProjection(nn.Module):
    """The official `proj_model`: Linear (no bias) then LayerNorm (eps 1e-5), in fp32."""

    def __init__(self, audio_dim: int, proj_dim: int, device=None):
        super().__init__()
        self.proj = nn.Linear(audio_dim, proj_dim, bias=False, device=device)
        self.norm = nn.LayerNorm(proj_dim, device=device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.linear(features.float(), self.proj.weight.float())
        return F.layer_norm(x, self.norm.normalized_shape, self.norm.weight.float(), self.norm.bias.float(),
                            self.norm.eps)


class FantasyTalkingProcessor(nn.Module):
    """The per-block audio key/value projections (`blocks.N.cross_attn.processor.*`)."""

    def __init__(self, proj_dim: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.k_proj = CastLinear(proj_dim, dim, bias=False, device=device, dtype=dtype)
        self.v_proj = CastLinear(proj_dim, dim, bias=False, device=device, dtype=dtype)


class FantasyTalkingBlockAudio:
    """Per-forward state: the projected audio windows, their padding mask and the strength."""

    def __init__(self, windows: torch.Tensor, lens: torch.Tensor, audio_scale: float, latent_frames: int):
        self.windows = windows                                  # [F, W, proj_dim], compute dtype
        width = windows.shape[1]
        lens = lens.to(windows.device)
        self.empty = lens == 0                                  # frames with no audio token at all
        keep = torch.arange(width, device=windows.device)[None, :] < lens[:, None]
        keep = keep | self.empty[:, None]                       # attend to zeros, then drop the frame
        self.mask = None if bool(keep.all()) else keep          # [F, W] True = attend
        self.any_empty = bool(self.empty.any())
        self.audio_scale = float(audio_scale)
        self.latent_frames = latent_frames

    def self_attention(self, attn, q, k, inputs) -> None:
        return None

    def after_cross_attention(self, block, x, inputs) -> None:
        return None

    def cross_attention(self, attn: nn.Module, q: torch.Tensor, inputs) -> torch.Tensor:
        proc = getattr(attn, "processor", None)
        if not isinstance(proc, FantasyTalkingProcessor):
            raise RuntimeError("this Wan block has no FantasyTalking processor: attach the adapter with "
                               "dit.attach_audio(adapter) before running with FantasyTalking audio.")
        b, length, heads, head_dim = q.shape
        frames = self.latent_frames
        windows = self.windows.to(q.device, q.dtype)
        width = windows.shape[1]
        k = proc.k_proj(windows).unflatten(-1, (heads, head_dim))            # [F, W, H, D]
        v = proc.v_proj(windows).unflatten(-1, (heads, head_dim))
        k, v = (t.unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(b * frames, width, heads, head_dim) for t in (k, v))
        q_frames = q.reshape(b * frames, length // frames, heads, head_dim)
        mask = None
        if self.mask is not None:
            mask = self.mask.to(q.device).unsqueeze(0).expand(b, -1, -1).reshape(b * frames, 1, 1, width)
        out = attention(q_frames, k, v, mask, backend=inputs.attention_backend, layout="bshd")
        out = out.reshape(b, frames, length // frames, heads * head_dim)
        if self.any_empty:
            out = out * (~self.empty).to(device=out.device, dtype=out.dtype)[None, :, None, None]
        return out.reshape(b, length, heads * head_dim) * self.audio_scale


class _NoAudio:
    """The state of an audio_scale-0 forward: no audio term anywhere (the plain DiT, exactly)."""

    def self_attention(self, attn, q, k, inputs) -> None:
        return None

    def cross_attention(self, attn, q, inputs) -> None:
        return None

    def after_cross_attention(self, block, x, inputs) -> None:
        return None


# ------------------------------------------------------------------------------------------- adapter
def _block_device(block: nn.Module, default: torch.device) -> torch.device:
    """Where a block's weights are now (block swap may keep it in RAM); any tensor tells, as GGUF or
    int8 layers hold their weights under other names than `.weight`."""
    for tensor in (*block.parameters(), *block.buffers()):
        return tensor.device
    return default


class FantasyTalkingAdapter(AudioAdapter):
    """FantasyTalking's projector plus (until `attach`) its per-block processors; see the module docstring."""

    family = FAMILY

    def __init__(self, audio_dim: int, proj_dim: int, dim: int, num_layers: int, device=None):
        super().__init__()
        self.audio_dim, self.proj_dim, self.dim, self.num_layers = audio_dim, proj_dim, dim, num_layers
        self.proj_model = AudioProjection(audio_dim, proj_dim, device=device)
        # Plain list, not submodules: after `attach` the processors belong to the blocks alone.
        self._processors: list[FantasyTalkingProcessor] | None = []

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str, dit, *, dtype: torch.dtype | None = None) -> FantasyTalkingAdapter:
        """Load fantasytalking_model.ckpt (weights-only unpickling) or a flat safetensors version."""
        if not path.lower().endswith(PICKLE_EXTS + (".safetensors", ".sft")):
            raise CheckpointError(f"{path}: not a checkpoint file (expected .ckpt, .pt, .pth, .bin or .safetensors).")
        return cls.from_state_dict(load_state_dict(path), dit, dtype=dtype, what=path)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, object], dit, *, dtype: torch.dtype | None = None,
                        what: str = "the FantasyTalking state dict") -> FantasyTalkingAdapter:
        """Check the file against `dit.config` and build the adapter; the caller then runs
        `dit.attach_audio(adapter)`. `dtype`: storage of the per-block k/v weights (default: the DiT's
        compute dtype); the projector stays fp32. Raises CheckpointError naming what is wrong."""
        flat = flat_state_dict(sd)
        _refuse_other_files(flat.keys(), what)
        config = dit.config
        check_dit_config(config, f"FantasyTalking ({what})")
        proj = flat.get(PROJ_PREFIX + "proj.weight")
        if not isinstance(proj, torch.Tensor) or proj.dim() != 2:
            raise CheckpointError(f"{what}: proj_model.proj.weight is missing or not a [proj_dim, 768] matrix.")
        not_float = [k for k, t in flat.items() if not (isinstance(t, torch.Tensor) and t.is_floating_point())]
        if not_float:
            raise CheckpointError(f"{what}: tensor(s) {', '.join(not_float[:4])} are not floating point; the file is "
                                  "damaged or not FantasyTalking. Download fantasytalking_model.ckpt again.")
        proj_dim, audio_dim = proj.shape
        if config.dim >= FULL_SIZE_MIN_DIM and audio_dim != AUDIO_IN_DIM:
            raise CheckpointError(f"{what}: the audio projector takes {audio_dim}-wide features, but FantasyTalking "
                                  f"uses wav2vec2-base-960h ({AUDIO_IN_DIM}); the file is not FantasyTalking.")
        check_state_dict(expected_shapes(config.dim, config.num_layers, proj_dim, audio_dim), flat,
                         f"FantasyTalking for the {config.name} Wan DiT ({config.dim} wide, "
                         f"{config.num_layers} blocks) ({what})")
        device = dit.device
        adapter = cls(audio_dim, proj_dim, config.dim, config.num_layers, device=device)
        with torch.no_grad():
            adapter.proj_model.proj.weight.copy_(flat[PROJ_PREFIX + "proj.weight"])
            adapter.proj_model.norm.weight.copy_(flat[PROJ_PREFIX + "norm.weight"])
            adapter.proj_model.norm.bias.copy_(flat[PROJ_PREFIX + "norm.bias"])
        adapter.requires_grad_(False)
        store = dtype or dit.compute_dtype
        for i, block in enumerate(dit.blocks):
            where = _block_device(block, device)
            proc = FantasyTalkingProcessor(proj_dim, config.dim, device="meta")
            for kv in ("k", "v"):
                tensor = flat[PROC_PREFIX + _PROC_KEY.format(i, kv)].to(device=where, dtype=store)
                getattr(proc, f"{kv}_proj").weight = nn.Parameter(tensor, requires_grad=False)
            adapter._processors.append(proc)
        return adapter

    def attach(self, dit) -> None:
        """Put block i's processor at `dit.blocks[i].cross_attn.processor` (on that block's device)."""
        if self._processors is None:
            raise ValueError("this FantasyTalking adapter is already attached to a Wan model; load it again for "
                             "another model.")
        if len(dit.blocks) != len(self._processors) or dit.config.dim != self.dim:
            raise ValueError(f"this FantasyTalking adapter was built for a {self.dim}-wide, {len(self._processors)}-"
                             f"block Wan DiT, not this {dit.config.dim}-wide, {len(dit.blocks)}-block one.")
        for block, proc in zip(dit.blocks, self._processors, strict=True):
            if hasattr(block.cross_attn, "processor"):
                raise ValueError("this Wan model already carries FantasyTalking processors; load the model again.")
            block.cross_attn.processor = proc.to(_block_device(block, dit.device))
        self._processors = None

    # ------------------------------------------------------------------ per forward
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[1, L, audio_dim] raw features -> [L, proj_dim] fp32 audio tokens (on the projector's device)."""
        if features.shape[-1] != self.audio_dim:
            raise ValueError(f"FantasyTalking audio features are {features.shape[-1]} wide, but this model takes "
                             f"{self.audio_dim} (wav2vec2-base-960h): encode the audio with the FantasyTalking "
                             "embeds node and the wav2vec2-base-960h speech encoder.")
        weight = self.proj_model.proj.weight
        return self.proj_model(features.to(weight.device, torch.float32))[0]

    def prepare(self, conditioning: AudioConditioning, *, batch: int, grid: tuple[int, int, int],
                device: torch.device, dtype: torch.dtype):
        if not isinstance(conditioning, FantasyTalkingConditioning):
            raise ValueError(f"FantasyTalking takes FantasyTalkingConditioning, got {type(conditioning).__name__}")
        if self._processors is not None:
            raise RuntimeError("attach the FantasyTalking adapter with dit.attach_audio(adapter) before sampling.")
        if grid[0] != conditioning.latent_frames:
            raise ValueError(f"the FantasyTalking audio covers {conditioning.num_frames} video frames = "
                             f"{conditioning.latent_frames} latent frames, but the latent has {grid[0]}: make the "
                             "audio embeds with the same num_frames as the video.")
        if conditioning.audio_scale == 0.0:
            return _NoAudio()
        tokens = self.project(conditioning.features)
        starts, lens, width = conditioning.windows()
        windows = gather_windows(tokens, starts, lens, width).to(device=device, dtype=dtype)
        return FantasyTalkingBlockAudio(windows, lens, conditioning.audio_scale, conditioning.latent_frames)
