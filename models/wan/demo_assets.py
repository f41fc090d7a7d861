"""Tiny random-weight Wan 2.1 / 2.2 files with the real key layouts, for the demos, the example workflows'
API twins and the end-to-end tests (no download, a few MB in all, seconds on a CPU).

Each file is written the way the released ones are laid out: the DiT with official bare keys, the
VAE with official keys, the umT5 encoder under ComfyUI's HF names with its SentencePiece model
embedded as the `spiece_model` uint8 tensor, and CLIP vision in the official open-clip layout
(`visual.*` + `log_scale`). Only the widths are small: the same loaders read them as the real files.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import config as wan_config
from .dit import random_state_dict
from .t5 import TINY_UMT5, UMT5Encoder
from .vace import tiny_vace
from .vae import TINY_VAE, WanVAE
from .weights import build_on_meta

DIT_T2V = "wan_tiny_t2v.safetensors"
DIT_I2V = "wan_tiny_i2v.safetensors"
DIT_FLF2V = "wan_tiny_flf2v.safetensors"
DIT_TI2V = "wan2.2_tiny_ti2v_5B.safetensors"
VAE22 = "wan2.2_tiny_vae.safetensors"
END_IMAGE = "wan_demo_end.png"
DIT_VACE = "wan_tiny_vace.safetensors"
TEXT_ENCODER = "umt5_tiny_spiece.safetensors"
VAE = "wan_tiny_vae.safetensors"
CLIP_VISION = "clip_vision_tiny.safetensors"
START_IMAGE = "wan_demo_start.png"

_CORPUS = ["a red fox runs through fresh snow", "waves roll onto a quiet beach at sunset",
           "a paper boat drifts down a rain gutter", "the camera slowly circles a lighthouse at night",
           "a cat jumps onto a sunny windowsill", "city lights blur past a train window"]


def seeded_state_dict(factory: Callable[[], torch.nn.Module], seed: int,
                      draw: Callable[[str, torch.Size, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the model `factory` builds (on meta: nothing allocated but the result), as
    draw(key, shape, standard-normal noise of that shape), the noise drawn in state-dict order.
    The draw decides the scale per kind of tensor, so tests can make every layer matter."""
    gen = torch.Generator().manual_seed(seed)
    return {name: draw(name, t.shape, torch.randn(t.shape, generator=gen))
            for name, t in build_on_meta(factory).state_dict().items()}


def _demo_draw(name: str, shape: torch.Size, noise: torch.Tensor) -> torch.Tensor:
    """Norm gains near 1, matrices scaled by 1/sqrt(fan-in), other vectors small: activations stay in range."""
    if name.endswith(("gamma", "norm.weight", "norm1.weight", "norm2.weight")) or ".norm" in name and \
            name.endswith("weight"):
        return 1.0 + 0.1 * noise
    if len(shape) >= 2:
        return noise / math.sqrt(math.prod(shape[1:]))
    return 0.02 * noise


def tiny_vae_state_dict(seed: int = 13) -> dict[str, torch.Tensor]:
    """The tiny Wan 2.1 VAE's random weights (Anima's demo VAE is this same tower)."""
    return seeded_state_dict(lambda: WanVAE(TINY_VAE), seed, _demo_draw)


def tiny_vae22_state_dict(seed: int = 23) -> dict[str, torch.Tensor]:
    """The tiny Wan 2.2 VAE's random weights (TI2V demos)."""
    from .vae22 import TINY_VAE22, Wan22VAE

    return seeded_state_dict(lambda: Wan22VAE(TINY_VAE22), seed, _demo_draw)


def tiny_spiece_model() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS * 10), model_writer=buf, vocab_size=96,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


def _umt5_hf_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official umT5 names -> the HF/ComfyUI names (the loader's renaming table, inverted)."""
    per_block = {"attn.q.weight": "layer.0.SelfAttention.q.weight", "attn.k.weight": "layer.0.SelfAttention.k.weight",
                 "attn.v.weight": "layer.0.SelfAttention.v.weight", "attn.o.weight": "layer.0.SelfAttention.o.weight",
                 "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
                 "norm1.weight": "layer.0.layer_norm.weight", "norm2.weight": "layer.1.layer_norm.weight",
                 "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
                 "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
                 "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    out = {}
    for key, t in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = t
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = t
        else:
            _, index, rest = key.split(".", 2)
            out[f"encoder.block.{index}.{per_block[rest]}"] = t
    return out


def tiny_clip_config():
    """ViT-H/14 geometry (224 px, patch 14: the 257 tokens the I2V DiT attends to) at width 64."""
    from .clip_vision import ClipVisionConfig

    return ClipVisionConfig(image_size=224, patch_size=14, dim=64, mlp_dim=96, num_heads=16, num_layers=3,
                            out_dim=16)


def write_start_image(path: Path, width: int = 80, height: int = 56, flip: bool = False) -> None:
    """A colour ramp (mirrored for the end frame of first/last-frame demos)."""
    from PIL import Image

    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    if flip:
        xs = 1 - xs
    rgb = torch.stack([xs, ys, 1 - 0.5 * (xs + ys)], dim=-1)
    Image.fromarray((rgb * 255).round().to(torch.uint8).numpy()).save(path)


def _save(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_tiny_wan_models(models_root: Path, input_root: Path | None = None, image_to_video: bool = True) -> None:
    """Write every tiny file the Wan demos need under `models_root` (ComfyUI folder names)."""
    models_root = Path(models_root)
    text_dim = TINY_UMT5.dim
    clip_cfg = tiny_clip_config() if image_to_video else None
    clip_dim = clip_cfg.dim if clip_cfg is not None else 1280
    t2v = wan_config.tiny("t2v", text_dim=text_dim, clip_dim=clip_dim)
    _save(random_state_dict(t2v, seed=11), models_root / "diffusion_models" / DIT_T2V)
    _save(random_state_dict(tiny_vace(text_dim=text_dim), seed=16), models_root / "diffusion_models" / DIT_VACE)

    umt5 = _umt5_hf_names(seeded_state_dict(lambda: UMT5Encoder(TINY_UMT5), 12, _demo_draw))
    umt5["spiece_model"] = torch.frombuffer(bytearray(tiny_spiece_model()), dtype=torch.uint8)
    _save(umt5, models_root / "text_encoders" / TEXT_ENCODER)
    _save(tiny_vae_state_dict(13), models_root / "vae" / VAE)

    if image_to_video:
        from .clip_vision import WanClipVision

        i2v = wan_config.tiny("i2v", text_dim=text_dim, clip_dim=clip_dim)
        _save(random_state_dict(i2v, seed=14), models_root / "diffusion_models" / DIT_I2V)
        write_tiny_wan22_models(models_root, text_dim, clip_dim)
        clip = {f"visual.{k}": v for k, v in seeded_state_dict(lambda: WanClipVision(clip_cfg), 15, _demo_draw).items()}
        clip["log_scale"] = torch.tensor(math.log(1 / 0.07))
        _save(clip, models_root / "clip_vision" / CLIP_VISION)
        if input_root is not None:
            Path(input_root).mkdir(parents=True, exist_ok=True)
            write_start_image(Path(input_root) / START_IMAGE)
            write_start_image(Path(input_root) / END_IMAGE, flip=True)


def write_tiny_wan22_models(models_root: Path, text_dim: int, clip_dim: int) -> None:
    """The first/last-frame and TI2V demo files: an FLF2V DiT, a TI2V-5B-shaped DiT and the Wan 2.2 VAE."""
    models_root = Path(models_root)
    flf2v = wan_config.tiny("flf2v", text_dim=text_dim, clip_dim=clip_dim)
    _save(random_state_dict(flf2v, seed=16), models_root / "diffusion_models" / DIT_FLF2V)
    ti2v = wan_config.tiny("ti2v", text_dim=text_dim)
    _save(random_state_dict(ti2v, seed=17), models_root / "diffusion_models" / DIT_TI2V)
    _save(tiny_vae22_state_dict(18), models_root / "vae" / VAE22)
