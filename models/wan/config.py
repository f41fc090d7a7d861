"""Wan 2.1 / 2.2 DiT configurations, and reading them back from a checkpoint's tensor shapes.

The released checkpoints carry no config, so a loader has to infer one. We read every width from
the weights (block count from the keys, as ComfyUI does) instead of guessing layer counts from
the model width (kijai's early loader), so tiny test checkpoints and pruned models load too.
The head count is the one number the shapes cannot give: it comes from the file's metadata when
the file stores it, else width / 128 (every released Wan 2.1 model has 128-wide heads).

Detection is table-driven: `detect_config` reads a "custom" config from the shapes, then `KNOWN`
(one row per released model) names it and labels it with its `variant` ("t2v-A14B", "ti2v-5B", …)
and Wan `generation`, which the sampler uses for the official expert boundary and which others use
to refuse mismatches. Shapes alone cannot tell a Wan 2.2 T2V-A14B expert from the Wan 2.1 T2V-14B
(same tree): a hint (kijai's `model_type.*` marker key, the metadata, the file name) decides, else
it counts as Wan 2.1. A file that is a Wan model we cannot run (`UNSUPPORTED`) says what it is.

Key prefixes are handled here, in one place: `strip_dit_prefix` accepts official bare keys,
ComfyUI's `model.diffusion_model.` (repackaged and all-in-one files), `diffusion_model.`,
`model.` and kijai/Ovi's `video_model.`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from ..checkpoint import CheckpointError
from ..common.state_dict import count_numbered

MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v")
HEAD_DIM = 128  # every released Wan model; the fallback when a file does not store its head count
GENERATIONS = ("2.1", "2.2")
EXPERTS = ("high_noise", "low_noise")

# Tried in this order; the first one under which the DiT's anchor key exists wins.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "video_model.", "model.", "")
_ANCHORS = ("head.modulation", "patch_embedding.weight")
# Marker tensors some converters add beside the weights; they carry no weights.
_MARKER_KEYS = ("scaled_fp8",)
_MARKER_PREFIXES = ("model_type.",)


@dataclass(frozen=True)
class WanDiTConfig:
    """Everything that fixes the DiT's module tree and tensor shapes (official names)."""

    name: str
    model_type: str                 # "t2v", "i2v" (20 image channels [+ CLIP]), "flf2v" (+ emb_pos),
    #                                 "ti2v" (48-channel latent; the image is the clean first latent frame)
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16                # 36 for i2v/flf2v: 16 noise + 4 mask + 16 image latent
    out_dim: int = 16
    text_dim: int = 4096            # umT5-XXL width
    text_len: int = 512             # text context is zero-padded to this many tokens
    freq_dim: int = 256             # sinusoidal time-embedding width
    clip_dim: int = 1280            # CLIP ViT-H/14 width
    clip_tokens: int = 257          # 514 for flf2v (two images)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    image_context: bool = True      # i2v/flf2v: the CLIP branch (img_emb, k_img/v_img); Wan 2.2 I2V-A14B has none
    # Labels, not architecture (see `same_architecture`): what a detected file is.
    variant: str = "custom"         # "t2v-1.3B", "t2v-A14B", "i2v-A14B", "ti2v-5B", "flf2v-14B", …
    generation: str = "2.1"         # Wan generation, "2.1" or "2.2"
    boundary: float | None = None   # A14B: the official high->low expert switch, as a fraction of 1000 timesteps
    expert: str | None = None       # A14B: "high_noise" / "low_noise" when the file says which
    # VACE (models/wan/vace.py): the main blocks after which VACE blocks 0, 1, … run, and the
    # VACE context's channels (96 = 16 inactive + 16 reactive latent + 64 mask). Empty: no VACE.
    vace_layers: tuple[int, ...] = ()
    vace_in_dim: int = 0
    # Fun reference adapter (`ref_conv`, Wan 2.1 Fun V1.1, Wan 2.2 Fun A14B Control): the channels of
    # the reference-image latent a Conv2d turns into one frame of tokens in front of the video. 0: none.
    ref_in_dim: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got '{self.model_type}'")
        if self.generation not in GENERATIONS:
            raise ValueError(f"generation must be one of {GENERATIONS}, got '{self.generation}'")
        if self.model_type == "ti2v" and self.in_dim != self.out_dim:
            raise ValueError(f"ti2v takes the latent alone: in_dim must equal out_dim, got {self.in_dim}/{self.out_dim}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")
        if self.has_image_input and self.in_dim <= self.out_dim:
            raise ValueError(f"{self.model_type} needs in_dim > out_dim (noise + mask + image latent), "
                             f"got in_dim {self.in_dim}, out_dim {self.out_dim}")
        if self.vace_layers and (self.vace_layers[0] != 0 or max(self.vace_layers) >= self.num_layers
                                 or list(self.vace_layers) != sorted(set(self.vace_layers))):
            raise ValueError(f"vace_layers {self.vace_layers} must start at block 0 and rise below {self.num_layers}")
        if self.ref_in_dim < 0:
            raise ValueError(f"ref_in_dim must be >= 0, got {self.ref_in_dim}")

    @property
    def is_vace(self) -> bool:
        return bool(self.vace_layers)

    @property
    def has_ref_conv(self) -> bool:
        """Fun models that take a reference image as a frame of tokens in front of the video."""
        return self.ref_in_dim > 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_image_input(self) -> bool:
        """i2v/flf2v: the extra `y` channels (mask + image latent) beside the noise."""
        return self.model_type in ("i2v", "flf2v")

    @property
    def has_clip(self) -> bool:
        """Whether the model attends to CLIP-vision tokens (`img_emb`); not Wan 2.2's I2V-A14B."""
        return self.has_image_input and self.image_context

    @property
    def vae_generation(self) -> str:
        """The VAE whose latent the model works in: 48 channels is the Wan 2.2 VAE, 16 the Wan 2.1 one."""
        return "2.2" if self.out_dim == 48 else "2.1"

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        """Pixels per latent element (frames, rows, columns): (4, 16, 16) for the Wan 2.2 VAE, else (4, 8, 8)."""
        return (4, 16, 16) if self.vae_generation == "2.2" else (4, 8, 8)

    @property
    def cond_channels(self) -> int:
        """Channels of `y` (mask + image latent) concatenated to the noise for i2v; 0 for t2v."""
        return self.in_dim - self.out_dim if self.has_image_input else 0

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head dims rotated by frame, row and column index: 44/42/42 for 128-wide heads."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def same_architecture(self, other: WanDiTConfig) -> bool:
        return _architecture(self) == _architecture(other)


def _architecture(config: WanDiTConfig) -> WanDiTConfig:
    return replace(config, name="", variant="custom", generation="2.1", boundary=None, expert=None)


WAN21_T2V_1_3B = WanDiTConfig("Wan2.1-T2V-1.3B", "t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                              variant="t2v-1.3B")
WAN21_T2V_14B = WanDiTConfig("Wan2.1-T2V-14B", "t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                             variant="t2v-14B")
# The 480P and 720P I2V models share one architecture; only the weights differ.
WAN21_I2V_14B_480P = WanDiTConfig("Wan2.1-I2V-14B-480P", "i2v", dim=5120, ffn_dim=13824, num_heads=40,
                                  num_layers=40, in_dim=36, variant="i2v-14B")
WAN21_I2V_14B_720P = replace(WAN21_I2V_14B_480P, name="Wan2.1-I2V-14B-720P")
WAN21_FLF2V_14B = WanDiTConfig("Wan2.1-FLF2V-14B-720P", "flf2v", dim=5120, ffn_dim=13824, num_heads=40,
                               num_layers=40, in_dim=36, clip_tokens=514, variant="flf2v-14B")
# Wan 2.2 (official wan/configs): each A14B model is two experts of the 14B tree, switched at `boundary`.
WAN22_T2V_A14B = replace(WAN21_T2V_14B, name="Wan2.2-T2V-A14B", variant="t2v-A14B", generation="2.2",
                         boundary=0.875)
WAN22_I2V_A14B = replace(WAN21_I2V_14B_480P, name="Wan2.2-I2V-A14B", variant="i2v-A14B", generation="2.2",
                         image_context=False, boundary=0.900)
WAN22_TI2V_5B = WanDiTConfig("Wan2.2-TI2V-5B", "ti2v", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
                             in_dim=48, out_dim=48, variant="ti2v-5B", generation="2.2")

# VACE: the t2v models plus VACE blocks after every 2nd (1.3B) / 5th (14B) block. The Wan 2.2
# Fun-VACE A14B experts have the 14B architecture and load as it.
WAN21_VACE_1_3B = replace(WAN21_T2V_1_3B, name="Wan2.1-VACE-1.3B", variant="vace-1.3B", vace_layers=tuple(range(0, 30, 2)), vace_in_dim=96)
WAN21_VACE_14B = replace(WAN21_T2V_14B, name="Wan2.1-VACE-14B", variant="vace-14B", vace_layers=tuple(range(0, 40, 5)), vace_in_dim=96)

# Fun (VideoX-Fun): i2v models whose extra channels are 4 mask + 16 image (InP, 36) or 16 control +
# 16 start image (Control, 48). Fun-14B-InP has the I2V-14B architecture and loads as it.
WAN21_FUN_INP_1_3B = WanDiTConfig("Wan2.1-Fun-1.3B-InP", "i2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                                  in_dim=36, variant="fun-inp-1.3B")
WAN21_FUN_CONTROL_1_3B = replace(WAN21_FUN_INP_1_3B, name="Wan2.1-Fun-1.3B-Control", in_dim=48,
                                 variant="fun-control-1.3B")
WAN21_FUN_CONTROL_14B = replace(WAN21_I2V_14B_480P, name="Wan2.1-Fun-14B-Control", in_dim=48,
                                variant="fun-control-14B")
# Fun V1.1 Control adds the reference adapter (`ref_conv`, 16 latent channels -> tokens). Wan 2.2 Fun
# A14B Control experts are the Wan 2.2 I2V-A14B tree (no CLIP) with 16 control + 4 mask + 16 start-image
# channels (52 in all) and the adapter; the Wan 2.2 Fun A14B InP experts have exactly the Wan 2.2
# I2V-A14B layout and load as it.
WAN21_FUN_V11_CONTROL_1_3B = replace(WAN21_FUN_CONTROL_1_3B, name="Wan2.1-Fun-V1.1-1.3B-Control", ref_in_dim=16,
                                     variant="fun-v1.1-control-1.3B")
WAN21_FUN_V11_CONTROL_14B = replace(WAN21_FUN_CONTROL_14B, name="Wan2.1-Fun-V1.1-14B-Control", ref_in_dim=16,
                                    variant="fun-v1.1-control-14B")
WAN22_FUN_CONTROL_A14B = replace(WAN22_I2V_A14B, name="Wan2.2-Fun-A14B-Control", in_dim=52, ref_in_dim=16,
                                 variant="fun-control-A14B")

# Every released model detection can name. Rows sharing an architecture are told apart by generation
# (a hint in the file, else the first row, Wan 2.1). Further families add their rows here.
KNOWN: tuple[WanDiTConfig, ...] = (
    WAN21_T2V_1_3B, WAN21_T2V_14B, WAN21_I2V_14B_480P, WAN21_I2V_14B_720P, WAN21_FLF2V_14B,
    WAN22_T2V_A14B, WAN22_I2V_A14B, WAN22_TI2V_5B,
    WAN21_VACE_1_3B, WAN21_VACE_14B, WAN21_FUN_INP_1_3B, WAN21_FUN_CONTROL_1_3B, WAN21_FUN_CONTROL_14B,
    WAN21_FUN_V11_CONTROL_1_3B, WAN21_FUN_V11_CONTROL_14B, WAN22_FUN_CONTROL_A14B)
CONFIGS: dict[str, WanDiTConfig] = {c.name: c for c in KNOWN}

# Wan models with modules this DiT does not have: (key fragment, what it is and what to use instead).
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("casual_audio_encoder.", "a Wan 2.2 S2V (speech-to-video) model; run it with ComfyUI's native Wan nodes"),
    ("face_adapter.", "a Wan 2.2 Animate model; run it with ComfyUI's native Wan nodes (WanAnimateToVideo)"),
    ("audio_proj.", "a HuMo (audio-conditioned Wan) model; run it with ComfyUI's native Wan nodes"),
    ("control_adapter.", "a Wan Fun Camera model (Fun Control-Camera: its camera adapter 'control_adapter.*' takes camera-pose "
                         "embeddings, which this pack does not build); run it with ComfyUI's native "
                         "WanCameraEmbedding + WanCameraImageToVideo nodes, or use the plain Fun Control model"),
)


def tiny(model_type: str = "t2v", *, num_layers: int = 2, text_dim: int = 4096, clip_dim: int = 1280,
         name: str | None = None, image_context: bool = True) -> WanDiTConfig:
    """A few-MB config with the real structure (128-wide heads, 44/42/42 RoPE split, 20 i2v channels,
    48 ti2v channels). `image_context=False` is the Wan 2.2 I2V-A14B shape (no CLIP branch).

    Width 256 with 2 heads keeps head_dim at 128 so detection from shapes alone finds the same
    config. `text_dim`/`clip_dim` can shrink to pair the DiT with tiny text/CLIP encoders.
    """
    is_image = model_type in ("i2v", "flf2v")
    channels = 48 if model_type == "ti2v" else 16
    return WanDiTConfig(name or f"tiny-{model_type}", model_type, dim=256, ffn_dim=512, num_heads=2,
                        num_layers=num_layers, in_dim=36 if is_image else channels, out_dim=channels,
                        text_dim=text_dim, clip_dim=clip_dim, clip_tokens=514 if model_type == "flf2v" else 257,
                        image_context=image_context or not is_image,
                        generation="2.2" if model_type == "ti2v" or not image_context else "2.1")


T = TypeVar("T")


def find_dit_prefix(keys: Sequence[str] | Mapping[str, object]) -> str | None:
    """The key prefix under which a Wan DiT sits in a file, or None if there is no Wan DiT."""
    keyset = set(keys)
    for prefix in DIT_PREFIXES:
        if all(prefix + anchor in keyset for anchor in _ANCHORS):
            return prefix
    return None


def strip_dit_prefix(sd: Mapping[str, T], what: str = "checkpoint") -> tuple[dict[str, T], str]:
    """The DiT's own entries under official names, and the prefix they had.

    Entries outside the prefix (the VAE and text encoder of a ComfyUI all-in-one file) and
    converter marker tensors are dropped; everything else must then match the model exactly.
    """
    prefix = find_dit_prefix(sd)
    if prefix is None:
        raise CheckpointError(f"{what}: not a Wan diffusion model. {_what_is_it(sd)}")
    out: dict[str, T] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in _MARKER_KEYS or name.startswith(_MARKER_PREFIXES):
            continue
        out[name] = value
    return out, prefix


def _what_is_it(keys: Mapping[str, object] | Sequence[str]) -> str:
    """A hint naming what a non-DiT file most likely is, for the error message."""
    keyset = list(keys)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keyset)

    if has("vace_blocks.") and not has("head.modulation"):
        return ("It holds only the VACE blocks of a Wan VACE model (a 'VACE module' file, without the "
                "base model); load the full VACE checkpoint instead (e.g. wan2.1_vace_14B_fp16.safetensors).")
    if has("decoder.conv1.weight") or has("decoder.middle.0.residual"):
        return "It looks like a VAE; load it with the Wan VAE loader."
    if has("token_embedding.weight") or has("encoder.block.0.layer.0.SelfAttention"):
        return "It looks like the umT5 text encoder; load it with the text-encoder loader."
    if has("visual.transformer") or has("vision_model.encoder"):
        return "It looks like a CLIP vision model; load it with the CLIP-vision loader."
    if has("condition_embedder.") or has("scale_shift_table"):
        return ("It is a Diffusers-format Wan transformer; use the single-file release "
                "(official Wan-AI or Comfy-Org repackaged) instead.")
    if has("lora_A") or has("lora_down") or has("lora_up"):
        return "It is a LoRA; apply it to a loaded model with the LoRA loader instead."
    sample = ", ".join(sorted(keyset)[:4]) or "no tensors"
    return f"Expected keys such as 'head.modulation' and 'patch_embedding.weight'; found {sample} …"


def count_blocks(keys: Sequence[str] | Mapping[str, object]) -> int:
    """Number of transformer blocks: 1 + the highest `blocks.N.` index (0 if none)."""
    return count_numbered(keys, "blocks.")


def heads_from_metadata(metadata: Mapping[str, str] | None) -> int | None:
    """A head count stored in safetensors metadata: `num_heads`, or inside a JSON `config`."""
    if not metadata:
        return None
    for key in ("num_heads", "num_attention_heads"):
        if key in metadata and str(metadata[key]).strip().isdigit():
            return int(metadata[key])
    for key in ("config", "model_config"):
        raw = metadata.get(key)
        if not raw:
            continue
        try:
            cfg = json.loads(raw)
        except (TypeError, json.JSONDecodeError):
            continue
        if isinstance(cfg, dict):
            for field in ("num_heads", "num_attention_heads"):
                if isinstance(cfg.get(field), int):
                    return cfg[field]
    return None


def file_hint(keys: Sequence[str] | Mapping[str, object] = (), metadata: Mapping[str, str] | None = None,
              name: str = "") -> str:
    """Lower-case text that may say which release a file is: kijai's `model_type.*` marker keys,
    the metadata's model-type entries and the file name (shapes cannot tell Wan 2.1 T2V-14B from
    a Wan 2.2 T2V-A14B expert, nor a high-noise expert from a low-noise one)."""
    parts = [name.replace("\\", "/").rsplit("/", 1)[-1]]
    parts += [k.split("model_type.", 1)[1] for k in keys if "model_type." in k]
    for key in ("model_type", "modelspec.architecture", "modelspec.title", "config", "model_config"):
        if metadata and metadata.get(key):
            parts.append(str(metadata[key])[:2000])
    return " ".join(parts).lower()


def _says_wan22(hint: str) -> bool:
    compact = hint.replace("_", "").replace("-", "").replace(".", "")
    return "wan22" in compact or "a14b" in compact or any(e.replace("_", "") in compact for e in EXPERTS)


def _expert(hint: str) -> str | None:
    """'high_noise' / 'low_noise' (also kijai's '-HIGH' / '-LOW' name parts) when the hint says which."""
    compact = hint.replace("-", "_")
    words = set(re.split(r"[^a-z0-9]+", hint))
    for expert in EXPERTS:
        if expert in compact or expert.replace("_", "") in compact or expert.split("_")[0] in words:
            return expert
    return None


def detect_config(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None,
                  num_heads: int | None = None, what: str = "checkpoint", hint: str | None = None) -> WanDiTConfig:
    """The config of a DiT from its tensor shapes (keys under official names, prefix stripped).

    `num_heads` overrides the metadata / width-128 rule. `hint` (see `file_hint`; default: from
    `metadata` and `what`) picks the generation where shapes cannot. The returned config carries
    the name, variant and generation of the released model it matches, or 'custom'.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{what}: missing tensor '{key}', needed to read the model's size. "
                                  f"{_what_is_it(shapes)}")
        return tuple(int(s) for s in shapes[key])

    for fragment, description in UNSUPPORTED:
        if any(fragment in k for k in shapes):
            raise CheckpointError(f"{what}: this is {description}; the Wan Model Loader does not support it.")
    patch_w = shape("patch_embedding.weight")          # [dim, in_dim, pt, ph, pw]
    if len(patch_w) != 5:
        raise CheckpointError(f"{what}: 'patch_embedding.weight' has shape {patch_w}; a Wan DiT has a 5-D "
                              "Conv3d weight [dim, in_dim, 1, 2, 2].")
    dim, in_dim, patch = patch_w[0], patch_w[1], patch_w[2:]
    num_layers = count_blocks(shapes)
    if num_layers == 0:
        raise CheckpointError(f"{what}: no 'blocks.N.' tensors; the file holds no transformer blocks.")
    ffn_dim = shape("blocks.0.ffn.0.weight")[0]
    out_dim = shape("head.head.weight")[0] // math.prod(patch)
    text_dim = shape("text_embedding.0.weight")[1]
    freq_dim = shape("time_embedding.0.weight")[1]
    has_clip = "img_emb.proj.0.weight" in shapes or "blocks.0.cross_attn.k_img.weight" in shapes
    model_type, clip_dim, clip_tokens = _model_type(in_dim, out_dim, has_clip, what), 1280, 257
    if has_clip:
        clip_dim = shape("img_emb.proj.0.weight")[0]
        if "img_emb.emb_pos" in shapes:
            model_type, clip_tokens = "flf2v", shape("img_emb.emb_pos")[1]
    ref_in_dim = 0
    if "ref_conv.weight" in shapes:             # Fun reference adapter: Conv2d [dim, C, ph, pw]
        ref_w = shape("ref_conv.weight")
        if len(ref_w) != 4 or ref_w[0] != dim or tuple(ref_w[2:]) != tuple(patch[1:]) or model_type != "i2v":
            raise CheckpointError(f"{what}: 'ref_conv.weight' has shape {ref_w}; a Wan Fun reference adapter is a "
                                  f"Conv2d [{dim}, C, {patch[1]}, {patch[2]}] on an image-conditioned model "
                                  f"(this one is {model_type}, width {dim}).")
        ref_in_dim = ref_w[1]
    vace_layers, vace_in_dim = (), 0
    if "vace_patch_embedding.weight" in shapes:   # VACE: the same blocks plus a VACE stack
        vace_in_dim = shape("vace_patch_embedding.weight")[1]
        count = count_numbered(shapes, "vace_blocks.")
        vace_layers = _vace_layers_from_metadata(metadata, count) or vace_layers_for(num_layers, count, what)
    heads = num_heads or heads_from_metadata(metadata)
    if heads is None:
        if dim % HEAD_DIM:
            raise CheckpointError(
                f"{what}: width {dim} is not a multiple of {HEAD_DIM}, so the head count cannot be inferred and "
                "the file's metadata does not store 'num_heads'. Re-save it with that metadata entry.")
        heads = dim // HEAD_DIM
    try:
        config = WanDiTConfig("custom", model_type, dim=dim, ffn_dim=ffn_dim, num_heads=heads,
                              num_layers=num_layers, in_dim=in_dim, out_dim=out_dim, text_dim=text_dim,
                              freq_dim=freq_dim, clip_dim=clip_dim, clip_tokens=clip_tokens,
                              patch_size=tuple(patch), image_context=has_clip or model_type not in ("i2v", "flf2v"),
                              generation="2.1" if has_clip or model_type == "t2v" else "2.2",
                              vace_layers=vace_layers, vace_in_dim=vace_in_dim,
                              ref_in_dim=ref_in_dim)  # type: ignore[arg-type]
    except ValueError as exc:
        raise CheckpointError(f"{what}: inconsistent Wan DiT shapes ({exc}).") from exc
    return label(config, file_hint((), metadata, what) if hint is None else hint)


def _model_type(in_dim: int, out_dim: int, has_clip: bool, what: str) -> str:
    """What the channel counts say: 16/16 t2v, 36/16 i2v (20 image channels; 48/16 Fun Control), 48/48 ti2v."""
    if in_dim == out_dim == 48:
        return "ti2v"
    if out_dim == 48:
        raise CheckpointError(
            f"{what}: in/out channels {in_dim}/{out_dim}: a 48-channel output is the Wan 2.2 VAE's latent, which only "
            "TI2V-5B (48/48) uses; this file is not a model the loader knows.")
    if in_dim == out_dim:
        if has_clip:
            raise CheckpointError(f"{what}: the file has a CLIP image branch but no image channels (in_dim {in_dim}); "
                                  "it is not a model this loader knows.")
        return "t2v"
    return "i2v"


def label(config: WanDiTConfig, hint: str = "") -> WanDiTConfig:
    """`config` named and labelled as the released model (a row of `KNOWN`) it matches, or 'custom'.

    Rows of one architecture (Wan 2.1 T2V-14B and a Wan 2.2 T2V-A14B expert) are told apart by the
    hint; the 480P/720P I2V rows share a name, 'Wan2.1-I2V-14B (480P/720P)'. A14B experts take the
    expert role the hint names.
    """
    matches = [c for c in KNOWN if c.same_architecture(config)]
    if len(matches) > 1 and len({c.generation for c in matches}) > 1:
        wanted = "2.2" if _says_wan22(hint) else "2.1"
        matches = [c for c in matches if c.generation == wanted]
    if not matches:
        return replace(config, name="custom")
    row = matches[0]
    name = row.name
    if len(matches) > 1:
        stem = row.name.rsplit("-", 1)[0]
        name = f"{stem} ({'/'.join(m.name.rsplit('-', 1)[1] for m in matches)})"
    return replace(config, name=name, variant=row.variant, generation=row.generation, boundary=row.boundary,
                   expert=_expert(hint) if row.boundary is not None else None)


def _vace_layers_from_metadata(metadata: Mapping[str, str] | None, count: int) -> tuple[int, ...] | None:
    """`vace_layers` from a JSON `config` in the file's metadata (diffusers-style exports keep the
    official config.json there), when it lists one entry per VACE block."""
    for key in ("config", "model_config"):
        try:
            cfg = json.loads((metadata or {}).get(key) or "null")
        except (TypeError, json.JSONDecodeError):
            continue
        layers = cfg.get("vace_layers") if isinstance(cfg, dict) else None
        if isinstance(layers, list) and len(layers) == count and all(isinstance(i, int) for i in layers):
            return tuple(layers)
    return None


def vace_layers_for(num_layers: int, vace_blocks: int, what: str = "checkpoint") -> tuple[int, ...]:
    """Where the VACE blocks of a file hook in: evenly from block 0, every num_layers // vace_blocks
    blocks (the official 1.3B and 14B configs, and ComfyUI's rule); the shapes do not store it."""
    step = num_layers // vace_blocks if vace_blocks else 0
    layers = tuple(range(0, num_layers, step)) if step else ()
    if len(layers) != vace_blocks:
        raise CheckpointError(f"{what}: {vace_blocks} VACE blocks for {num_layers} main blocks cannot be placed "
                              "evenly, so where they hook in is unknown (released VACE models have 15 of 30 "
                              "or 8 of 40). Re-save the file from a released VACE model.")
    return layers


def known_name(config: WanDiTConfig) -> str:
    """The released model a config matches ('Wan2.1-I2V-14B (480P/720P)' for the shared I2V one)."""
    return label(config).name
