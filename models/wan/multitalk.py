"""MultiTalk and InfiniteTalk (MeiGen) on our Wan DiT: the speech weights users load beside a
Wan 2.1 I2V-14B model, attached through the audio hook seam (models/wan/audio_hooks.py).

    adapter = MultiTalkAdapter.from_file("multitalk.safetensors", dit)   # or .from_state_dict(sd, dit)
    dit.attach_audio(adapter)
    v = dit(x, t, context, clip_fea, y, audio=MultiTalkConditioning(features, regions))

The files (MultiTalk `multitalk.safetensors`, InfiniteTalk `infinitetalk_single/multi.safetensors`,
their fp16/fp8 re-saves) hold, under the official names (bare, or under a `model.diffusion_model.` /
`diffusion_model.` prefix):

    audio_proj.proj1 / proj1_vf / proj2 / proj3 (.weight, .bias), audio_proj.norm (.weight, .bias)
    blocks.N.audio_cross_attn.q_linear / kv_linear / proj (.weight, .bias), blocks.N.norm_x (.weight, .bias)

330 tensors for the 40-block 14B model; InfiniteTalk has the same tree. A file that is a whole DiT
with those weights in it is accepted too: only its audio weights are used (the base model is the
one loaded by the Wan model loader), and a note says so.

Which DiTs take them (`check_dit`): the model must be a Wan 2.1 image-to-video model with the CLIP
branch (i2v, not flf2v), and the file's width and block count must equal the model's. The released
files are 5120 wide with 40 blocks, so that is exactly Wan2.1-I2V-14B (480P/720P and its fine-tunes);
the same rules let tiny test models of any width pair with tiny files of that width.

Per-block weights become `blocks.N.audio_cross_attn` (CastLinear q_linear/kv_linear/proj) and
`blocks.N.norm_x` of the DiT, so fp8 storage, int8 conversion (attach before converting), LoRA and
block swap see them like any block Linear. The projector (`AudioProjModel`) stays on the adapter.

Projector (official AudioProjModel): latent frame 0 takes video frame 0's 5-frame window (proj1);
latent frame n ≥ 1 covers video frames 4n-3..4n and takes the first frame's window up to its
centre, the centres of the two middle frames and the last frame's window from its centre: 3 + 2 + 3
= 8 rows (proj1_vf). Then relu, proj2, relu, proj3 to 32 tokens of 768, LayerNorm.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping

import torch
from torch import nn

from ...kernels.cast_linear import CastLinear
from ...kernels.precision import is_fp8
from ..checkpoint import (
    PICKLE_EXTS,
    CheckpointError,
    check_state_dict,
    load_state_dict,
    read_safetensors_header,
    refuse_non_float,
)
from ..common.loading import (
    DtypePlan,
    allocate_outputs,
    assign_weights,
    read_safetensors,
    split_weight_scales,
)
from .audio_hooks import AudioAdapter, AudioConditioning
from .config import known_name
from .dit import WanDiT
from .errors import WanInputError
from .layers import FP32LayerNorm
from .multitalk_attention import MultiTalkAudioAttention, MultiTalkBlockAudio
from .multitalk_conditioning import AUDIO_WINDOW, FAMILY, MultiTalkConditioning, audio_windows, token_regions

__all__ = ["MultiTalkAdapter", "MultiTalkConditioning", "MultiTalkProjector", "audio_windows", "is_multitalk_file",
           "multitalk_keys"]

log = logging.getLogger("slipstream.wan")

VAE_TIME_STRIDE = 4                            # video frames per latent frame after the first
LATTER_WINDOW = AUDIO_WINDOW + VAE_TIME_STRIDE - 1    # 8 rows for each latent frame after the first
ANCHOR = "audio_proj.proj1.weight"
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(audio_cross_attn|norm_x)\.")
_PROJ_LINEARS = ("proj1", "proj1_vf", "proj2", "proj3")
# Official sizes, for the full-size key table (tests and docs): 12 wav2vec2 layers of 768.
OFFICIAL = {"dim": 5120, "num_layers": 40, "frame_width": 12 * 768, "intermediate": 512, "audio_dim": 768,
            "context_tokens": 32}


def _prefix(keys: Collection[str]) -> str | None:
    return next((p for p in _PREFIXES if p + ANCHOR in keys), None)


def is_multitalk_file(keys: Collection[str]) -> bool:
    """Whether a file's key names are MultiTalk / InfiniteTalk speech weights (alone or in a full DiT)."""
    keys = set(keys)
    prefix = _prefix(keys)
    return prefix is not None and any(k.startswith(prefix + "blocks.0.audio_cross_attn.q_linear.") for k in keys)


def _is_audio_key(name: str) -> bool:
    return name.startswith("audio_proj.") or _BLOCK_KEY.match(name) is not None


def multitalk_keys(dim: int = OFFICIAL["dim"], num_layers: int = OFFICIAL["num_layers"],
                   frame_width: int = OFFICIAL["frame_width"], intermediate: int = OFFICIAL["intermediate"],
                   audio_dim: int = OFFICIAL["audio_dim"], context_tokens: int = OFFICIAL["context_tokens"],
                   norm: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of a MultiTalk / InfiniteTalk file of these sizes (default: released)."""
    with torch.device("meta"):
        tree = _WeightTree(dim, 1, num_layers, frame_width, intermediate, audio_dim, context_tokens, norm)
    return {k: tuple(v.shape) for k, v in tree.state_dict().items()}


def _what_else(keys: Collection[str]) -> str:
    """What a file without MultiTalk keys most likely is."""
    if any("proj_model." in k for k in keys) or any(".cross_attn.k_proj." in k for k in keys):
        return "It is a FantasyTalking file; load it as a speech model (it is recognised by its keys)."
    if any("casual_audio_encoder." in k for k in keys):
        return "It is a Wan 2.2 S2V model, which runs with ComfyUI's native Wan nodes."
    if any("audio_proj." in k for k in keys):
        return "It has 'audio_proj.' tensors of another model (HuMo?), not MultiTalk's projector."
    sample = ", ".join(sorted(keys)[:4]) or "no tensors"
    return f"Expected keys such as 'audio_proj.proj1.weight' and 'blocks.0.audio_cross_attn.q_linear.weight'; found {sample} …"


class MultiTalkProjector(nn.Module):
    """Official AudioProjModel: windowed speech features -> `context_tokens` audio tokens per latent frame."""

    def __init__(self, frame_width: int, intermediate: int, audio_dim: int, context_tokens: int, norm: bool):
        super().__init__()
        self.audio_dim, self.context_tokens = audio_dim, context_tokens
        self.proj1 = CastLinear(AUDIO_WINDOW * frame_width, intermediate)
        self.proj1_vf = CastLinear(LATTER_WINDOW * frame_width, intermediate)
        self.proj2 = CastLinear(intermediate, intermediate)
        self.proj3 = CastLinear(intermediate, context_tokens * audio_dim)
        self.norm = FP32LayerNorm(audio_dim, 1e-5) if norm else nn.Identity()

    @property
    def frame_width(self) -> int:
        return self.proj1.in_features // AUDIO_WINDOW

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """[S, 1 + 4k, 5, layers, channels] windows of a clip -> [S, 1 + k, tokens, audio_dim]."""
        first, latter = split_windows(windows)
        first = torch.relu(self.proj1(first.flatten(2)))                  # [S, 1, inter]
        latter = torch.relu(self.proj1_vf(latter.flatten(2)))             # [S, k, inter]
        hidden = torch.relu(self.proj2(torch.cat([first, latter], dim=1)))
        tokens = self.proj3(hidden).unflatten(-1, (self.context_tokens, self.audio_dim))
        return self.norm(tokens)


def split_windows(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, 1 + 4k, 5, ...] -> (first frame [S, 1, 5, ...], per latent frame after it [S, k, 8, ...])."""
    s, frames = windows.shape[:2]
    if (frames - 1) % VAE_TIME_STRIDE:
        raise WanInputError(f"{frames} video frames: MultiTalk needs 4k + 1 frames (one latent frame per 4 video "
                         "frames after the first).")
    centre = AUDIO_WINDOW // 2
    groups = windows[:, 1:].unflatten(1, (-1, VAE_TIME_STRIDE))          # [S, k, 4, 5, ...]
    latter = torch.cat([groups[:, :, 0, :centre + 1], groups[:, :, 1:-1, centre],
                        groups[:, :, -1, centre:]], dim=2)
    return windows[:, :1], latter


class _AudioBlock(nn.Module):
    """The speech modules of one DiT block, under their official names (built, then moved into the block)."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.audio_cross_attn = MultiTalkAudioAttention(dim, audio_dim, num_heads)
        self.norm_x = FP32LayerNorm(dim, eps, elementwise_affine=True)


class _WeightTree(nn.Module):
    """The module tree a file's keys name, so the shared loader can check and fill it strictly."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, frame_width: int, intermediate: int,
                 audio_dim: int, context_tokens: int, norm: bool, eps: float = 1e-6):
        super().__init__()
        self.audio_proj = MultiTalkProjector(frame_width, intermediate, audio_dim, context_tokens, norm)
        self.blocks = nn.ModuleList(_AudioBlock(dim, audio_dim, num_heads, eps) for _ in range(num_layers))


def _sizes(shapes: Mapping[str, tuple[int, ...]], what: str) -> dict[str, int | bool]:
    """The file's sizes from its shapes (official names), with a clear error for a broken table."""
    def shape(key: str, dims: int) -> tuple[int, ...]:
        if key not in shapes or len(shapes[key]) != dims:
            raise CheckpointError(f"{what}: tensor '{key}' is missing or not {dims}-D; the MultiTalk file is "
                                  "incomplete or damaged. Fetch it again.")
        return shapes[key]

    intermediate, first_in = shape("audio_proj.proj1.weight", 2)
    dim = shape("blocks.0.audio_cross_attn.q_linear.weight", 2)[0]
    audio_dim = shape("blocks.0.audio_cross_attn.kv_linear.weight", 2)[1]
    if first_in % AUDIO_WINDOW:
        raise CheckpointError(f"{what}: 'audio_proj.proj1.weight' takes {first_in} inputs, not {AUDIO_WINDOW} "
                              "frames of features; this is not a MultiTalk projector.")
    tokens = shape("audio_proj.proj3.weight", 2)[0]
    if tokens % audio_dim:
        raise CheckpointError(f"{what}: 'audio_proj.proj3' makes {tokens} values, not whole {audio_dim}-wide "
                              "audio tokens; the file is damaged.")
    layers = 1 + max((int(m.group(1)) for m in map(_BLOCK_KEY.match, shapes) if m), default=-1)
    return {"dim": dim, "num_layers": layers, "frame_width": first_in // AUDIO_WINDOW, "intermediate": intermediate,
            "audio_dim": audio_dim, "context_tokens": tokens // audio_dim, "norm": "audio_proj.norm.weight" in shapes}


def check_dit(dit: WanDiT, sizes: Mapping[str, int | bool], what: str) -> None:
    """Refuse a DiT the speech weights cannot drive, naming the model and what to load instead."""
    cfg = dit.config
    name = cfg.name if cfg.name != "custom" else known_name(cfg)
    needed = "Load Wan2.1-I2V-14B-480P or -720P (or a fine-tune of it) in the Wan model loader."
    if cfg.generation != "2.1" or cfg.model_type == "ti2v":
        raise CheckpointError(f"{what}: MultiTalk / InfiniteTalk are Wan 2.1 I2V-14B models, but the loaded model "
                              f"is {name} (Wan {cfg.generation}). {needed} For speech on Wan 2.2 use Wan2.2-S2V "
                              "with ComfyUI's native Wan nodes.")
    if cfg.model_type != "i2v" or not cfg.has_clip:
        kind = {"t2v": "a text-to-video model", "flf2v": "a first/last-frame model"}.get(cfg.model_type, cfg.model_type)
        raise CheckpointError(f"{what}: MultiTalk / InfiniteTalk drive the image-to-video model, but the loaded model "
                              f"is {name}, {kind}. {needed} (there is no MultiTalk for T2V or the 1.3B models).")
    if (cfg.dim, cfg.num_layers) != (sizes["dim"], sizes["num_layers"]):
        raise CheckpointError(f"{what}: the speech weights are for a DiT {sizes['dim']} wide with {sizes['num_layers']} "
                              f"blocks, but the loaded model ({name}) is {cfg.dim} wide with {cfg.num_layers} blocks. "
                              f"{needed}")


def _variant(what: str) -> str:
    """"multitalk", "infinitetalk-single", "infinitetalk-multi" or "infinitetalk" from a file name: the
    releases share one key table, so only the name tells them apart (it changes nothing but notes)."""
    name = what.replace("\\", "/").rsplit("/", 1)[-1].lower()
    if "infinite" not in name:
        return "multitalk"
    return next((f"infinitetalk-{kind}" for kind in ("single", "multi") if kind in name), "infinitetalk")


class MultiTalkAdapter(AudioAdapter):
    """MultiTalk / InfiniteTalk speech weights for one Wan DiT (see the module docstring)."""

    family = FAMILY

    def __init__(self, projector: MultiTalkProjector, blocks: list[_AudioBlock], variant: str = "multitalk",
                 patch_size: tuple[int, int, int] = (1, 2, 2)):
        super().__init__()
        self.patch_size = patch_size
        self.audio_proj = projector
        self.variant = variant                     # from the file name (see _variant), for logs
        self._pending: list[_AudioBlock] | None = blocks    # a plain list: not registered twice
        self._cache: list[tuple[object, tuple, torch.Tensor]] = []
        self._told_single = False

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], dit: WanDiT, *, dtype: torch.dtype | None = None,
                        what: str = "MultiTalk state dict") -> MultiTalkAdapter:
        """Check the speech weights against `dit` and build the adapter (not yet attached).

        `dtype`: compute dtype and storage (default: the DiT's compute dtype); block Linear weights
        follow the DiT's block weights when those are fp8. Raises CheckpointError with what to load
        for a file that is not MultiTalk, a damaged one, or a DiT it cannot drive.
        """
        prefix = _prefix(sd)
        if prefix is None or not is_multitalk_file(sd.keys()):
            raise CheckpointError(f"{what}: not a MultiTalk / InfiniteTalk file. {_what_else(list(sd))}")
        return cls._build(sd, prefix, prefix + "patch_embedding.weight" in sd, dit, dtype, what)

    @classmethod
    def _build(cls, sd: Mapping[str, torch.Tensor], prefix: str, whole_dit: bool, dit: WanDiT,
               dtype: torch.dtype | None, what: str) -> MultiTalkAdapter:
        if whole_dit:
            log.info("Wan: %s is a whole Wan DiT with MultiTalk weights; only its speech weights are used, the "
                     "base model is the one loaded in the Wan model loader.", what)
        entries = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and _is_audio_key(k[len(prefix):])}
        weights, scales = split_weight_scales(entries)
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        sizes = _sizes(shapes, what)
        check_dit(dit, sizes, what)
        with torch.device("meta"):
            tree = _WeightTree(num_heads=dit.config.num_heads, eps=dit.config.eps, **sizes)
        expected = {k: tuple(v.shape) for k, v in tree.state_dict().items()}
        check_state_dict(expected, {k: torch.empty(s, device="meta") for k, s in shapes.items()},
                         f"the MultiTalk weights for {dit.config.name} ({what})")
        refuse_non_float({k: v.dtype for k, v in tree.state_dict().items()}, {k: v.dtype for k, v in weights.items()},
                         what)
        compute = dtype or dit.compute_dtype
        block_linears = [k for k in expected if ".audio_cross_attn." in k and k.endswith(".weight")]
        dit_storage = dit.blocks[0].self_attn.q.weight.dtype
        plan = DtypePlan(compute, dit_storage if is_fp8(dit_storage) else compute, frozenset(block_linears))
        stored = {k: v.dtype for k, v in weights.items()}
        # where the blocks live (RAM for a block-swapped model): no detour through the GPU for 2.4 B weights
        device = dit.blocks[0].self_attn.q.weight.device
        outputs = allocate_outputs(shapes, stored, plan, device, [k + ".weight" for k in scales],
                                   adopt_unchanged=True)
        assign_weights(tree, ((k, weights[k]) for k in shapes), plan, device, scales, outputs=outputs)
        return cls(tree.audio_proj, list(tree.blocks), _variant(what), dit.config.patch_size)

    @classmethod
    def from_file(cls, path: str, dit: WanDiT, *, dtype: torch.dtype | None = None) -> MultiTalkAdapter:
        """Load from a safetensors (only the speech tensors are read, also from a whole-DiT file) or pickle."""
        if path.lower().endswith(PICKLE_EXTS):
            return cls.from_state_dict(load_state_dict(path), dit, dtype=dtype, what=path)
        header, _ = read_safetensors_header(path)
        prefix = _prefix(header)
        if prefix is None or not is_multitalk_file(header.keys()):
            raise CheckpointError(f"{path}: not a MultiTalk / InfiniteTalk file. {_what_else(list(header))}")
        keys = [k for k in header if k.startswith(prefix) and _is_audio_key(k[len(prefix):])]
        sd = dict(read_safetensors(path, keys))
        return cls._build(sd, prefix, prefix + "patch_embedding.weight" in header, dit, dtype, path)

    def attach(self, dit: WanDiT) -> None:
        """Put each block's speech modules into `dit.blocks[i]` (on that block's device)."""
        if self._pending is None:
            raise WanInputError("this MultiTalk adapter is already attached to a model; load the file again for another.")
        self.audio_proj.to(dit.device)          # beside the text embedding, on the compute device
        for block, audio in zip(dit.blocks, self._pending, strict=True):
            device = block.self_attn.q.weight.device
            block.audio_cross_attn = audio.audio_cross_attn.to(device)
            block.norm_x = audio.norm_x.to(device)
        self._pending = None

    # ----------------------------------------------------------------------------------- forward
    def prepare(self, conditioning: AudioConditioning, *, batch: int, grid: tuple[int, int, int],
                device: torch.device, dtype: torch.dtype) -> MultiTalkBlockAudio:
        if not isinstance(conditioning, MultiTalkConditioning):
            raise WanInputError(f"MultiTalk takes the features of the MultiTalk embeds node, got {type(conditioning).__name__}.")
        f, h, w = grid
        frames = VAE_TIME_STRIDE * (f - 1) + 1
        if conditioning.num_frames != frames:
            raise WanInputError(f"the audio features cover {conditioning.num_frames} video frames, but the latent has {f} "
                             f"frames = {frames} video frames: set num_frames of the MultiTalk embeds node to {frames}.")
        width = conditioning.features.shape[-2] * conditioning.features.shape[-1]
        if width != self.audio_proj.frame_width:
            raise WanInputError(f"the speech features have {tuple(conditioning.features.shape[-2:])} values per frame, "
                             f"but this {self.variant} model takes {self.audio_proj.frame_width}: encode the audio with "
                             "chinese-wav2vec2-base (12 layers of 768) in the MultiTalk embeds node.")
        tokens = self._tokens(conditioning, device, dtype)              # [S, f, tokens, audio_dim]
        speakers = conditioning.speakers
        if speakers == 2 and self.variant == "infinitetalk-single" and not self._told_single:
            self._told_single = True
            log.info("Wan: two speakers with InfiniteTalk's single-speaker weights; infinitetalk_multi is the "
                     "release trained for two.")
        tokens = tokens.permute(1, 0, 2, 3).reshape(f, -1, tokens.shape[-1])   # speaker 1's tokens, then 2's
        regions = None
        if speakers > 1:
            latent_hw = (h * self.patch_size[1], w * self.patch_size[2])
            regions = token_regions(conditioning.regions, latent_hw, (h, w)).to(device=device, dtype=dtype)
        return MultiTalkBlockAudio(tokens, speakers, regions, conditioning.audio_scale, self.audio_proj.context_tokens)

    def _tokens(self, conditioning: MultiTalkConditioning, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The projector's tokens, kept for the last two conditionings (a sampler asks every step)."""
        key = (device, dtype)
        for held, held_key, tokens in self._cache:
            if held is conditioning and held_key == key:
                return tokens
        with torch.no_grad():
            tokens = self.audio_proj(conditioning.features.to(device=device, dtype=dtype))
        self._cache = [*self._cache[-1:], (conditioning, key, tokens)]
        return tokens
