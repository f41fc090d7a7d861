"""Conditioning by clean latent frames (Wan 2.2 TI2V-5B image-to-video), and the latent size per model.

TI2V-5B has no image channels and no CLIP branch: its image-to-video mode writes the VAE-encoded
start image into the first latent frame, keeps it there after every solver step, and gives that
frame's tokens timestep 0 (the DiT's `denoise_mask`). The image embeds carry the normalised clean
latent and the mask; the sampler calls `impose_clean` and passes the mask on, nothing more.

Which VAE a model's latent belongs to (16 channels / 8x for Wan 2.1's, 48 / 16x for Wan 2.2's) is
the DiT config's `vae_generation`; `check_vae_generation` turns a mismatch between the embeds and
the model into an error that names the VAE file to load.
"""

from __future__ import annotations

import torch

from .config import WanDiTConfig

VAE_FILES = {"2.1": "wan_2.1_vae.safetensors", "2.2": "wan2.2_vae.safetensors"}


def video_latent_shape(config: WanDiTConfig, width: int, height: int, num_frames: int) -> tuple[int, int, int, int]:
    """[C, T, h, w] of the latent `config` samples for a video of this size."""
    st, sh, sw = config.vae_stride
    return (config.out_dim, (num_frames - 1) // st + 1, height // sh, width // sw)


def first_frames_mask(latent_frames: int, h: int, w: int, given: int = 1) -> torch.Tensor:
    """[1, T, h, w] denoise mask: 0 on the first `given` latent frames (kept clean), 1 elsewhere."""
    mask = torch.ones(1, latent_frames, h, w)
    mask[:, :given] = 0
    return mask


def clean_latent_frames(latent: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """A normalised latent of the given frames [C, K, h, w] placed at the start of [C, T, h, w] (zeros after)."""
    out = latent.new_zeros(latent.shape[0], latent_frames, *latent.shape[2:])
    out[:, : latent.shape[1]] = latent[:, :latent_frames]
    return out


def impose_clean(x: torch.Tensor, clean: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """x with the given frames put back: mask·x + (1 − mask)·clean (x [B, C, T, h, w]; clean [C, T, h, w];
    mask [1, T, h, w]). Unchanged when the embeds carry no clean frames."""
    if clean is None or mask is None:
        return x
    m = mask.to(device=x.device, dtype=x.dtype)[None]
    return x * m + clean.to(device=x.device, dtype=x.dtype)[None] * (1 - m)


def check_vae_generation(config: WanDiTConfig, model_name: str, y: torch.Tensor | None,
                         clean: torch.Tensor | None) -> None:
    """The image embeds were encoded with the VAE the model works with, or a clear error naming the fix."""
    made_with = None
    if clean is not None:
        made_with = "2.2" if clean.shape[0] == 48 else "2.1"
    elif y is not None:
        made_with = "2.2" if y.shape[0] - 4 == 48 else "2.1"
    if made_with is None or made_with == config.vae_generation:
        if clean is not None and config.model_type != "ti2v":
            raise ValueError(f"{model_name} ({config.variant}) does not take a clean first frame; these embeds are "
                             "for Wan 2.2 TI2V-5B. Load a TI2V-5B model, or encode with the model's own VAE.")
        return
    want = config.vae_generation
    raise ValueError(
        f"The image embeds were encoded with the Wan {made_with} VAE, but {model_name} ({config.variant}, Wan "
        f"{config.generation}) works in the Wan {want} VAE's latent. Load {VAE_FILES[want]} in Wan VAE Loader "
        "for Wan Image to Video Encode (and Wan Decode).")


def check_video_size(config: WanDiTConfig, model_name: str, width: int, height: int) -> None:
    """Sides that patch evenly: multiples of VAE stride x DiT patch (16 px for Wan 2.1 latents, 32 for TI2V-5B)."""
    side = config.vae_stride[1] * config.patch_size[1]
    if width % side or height % side:
        raise ValueError(f"{model_name} makes videos whose width and height are multiples of {side} px; got "
                         f"{width}x{height}. Use e.g. {width // side * side}x{height // side * side} "
                         f"(TI2V-5B's own size is 1280x704).")
