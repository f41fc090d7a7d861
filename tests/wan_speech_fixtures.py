"""A small stand-in speech family for the Wan speech sampler tests: an adapter that adds one CastLinear per block
(`blocks.N.toy_audio`) and a projector, fed by per-frame features, through the same hooks and loader
path (`is_<family>_file`, `from_state_dict`, `attach`, `prepare`) as the real families.

Its conditioning slices features by frame, so a test can see which frames each forward received;
its null branch is all-zero features (MultiTalk's way)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import torch
from slipstream.kernels.cast_linear import CastLinear
from slipstream.models.wan import config as wan_config
from slipstream.models.wan.audio_hooks import AudioAdapter
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.pipeline import WanImageEmbeds, WanModelHandle, WanTextEmbeds
from slipstream.models.wan.speech_models import SpeechFamily

FEAT = 8
TEXT_DIM = 32
CPU = torch.device("cpu")


@dataclass(frozen=True)
class ToyConditioning:
    family: str
    features: torch.Tensor            # [num_frames, FEAT]
    start: int = 0                    # first video frame these features belong to (for tests)

    @property
    def num_frames(self) -> int:
        return self.features.shape[0]

    def null(self) -> ToyConditioning:
        return replace(self, features=torch.zeros_like(self.features))

    def frames(self, start: int, count: int) -> ToyConditioning:
        if start < 0 or start + count > self.num_frames:
            raise IndexError(f"frames [{start}, {start + count}) outside {self.num_frames}")
        return replace(self, features=self.features[start:start + count], start=self.start + start)


class _State:
    def __init__(self, latent_feats: torch.Tensor, grid):
        self.latent_feats, self.grid = latent_feats, grid

    def self_attention(self, attn, q, k, inputs):
        return None

    def cross_attention(self, attn, q, inputs):
        return None

    def after_cross_attention(self, block, x, inputs):
        f, h, w = self.grid
        per_frame = block.toy_audio(self.latent_feats.to(inputs.compute_dtype))        # [f, dim]
        return per_frame[:, None, :].expand(f, h * w, -1).reshape(1, f * h * w, -1).expand(x.shape[0], -1, -1)


class ToyAdapter(AudioAdapter):
    def __init__(self, family: str, num_blocks: int, dim: int):
        super().__init__()
        self.family = family
        self.proj = torch.nn.Linear(FEAT, FEAT)
        self._block_weights: list[dict[str, torch.Tensor]] = [{} for _ in range(num_blocks)]
        self._dim = dim

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], dit: WanDiT, *, dtype=None, family="multitalk"):
        if not dit.config.has_image_input:
            raise ValueError(f"the toy speech model needs an I2V model, {dit.config.name} is {dit.config.model_type}")
        adapter = cls(family, len(dit.blocks), dit.config.dim)
        adapter.proj.load_state_dict({"weight": sd["toy_audio_proj.weight"], "bias": sd["toy_audio_proj.bias"]})
        for i in range(len(dit.blocks)):
            adapter._block_weights[i] = {"weight": sd[f"blocks.{i}.toy_audio.weight"],
                                         "bias": sd[f"blocks.{i}.toy_audio.bias"]}
        return adapter.to(dtype or torch.float32)

    def attach(self, dit: WanDiT) -> None:
        for block, weights in zip(dit.blocks, self._block_weights, strict=True):
            layer = CastLinear(FEAT, self._dim)
            layer.load_state_dict(weights)
            block.toy_audio = layer.to(dit.compute_dtype)

    def prepare(self, conditioning, *, batch, grid, device, dtype):
        feats = self.proj(conditioning.features.to(device=device, dtype=self.proj.weight.dtype))
        index = torch.tensor([0] + [4 * j for j in range(1, grid[0])]).clamp(max=feats.shape[0] - 1)
        return _State(feats[index], grid)


def is_toy_file(keys: Collection[str]) -> bool:
    return "toy_audio_proj.weight" in keys


def toy_state_dict(num_blocks: int, dim: int, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"toy_audio_proj.weight": torch.randn(FEAT, FEAT, generator=g) / FEAT ** 0.5,
          "toy_audio_proj.bias": 0.1 * torch.randn(FEAT, generator=g)}
    for i in range(num_blocks):
        sd[f"blocks.{i}.toy_audio.weight"] = 0.3 * torch.randn(dim, FEAT, generator=g)
        sd[f"blocks.{i}.toy_audio.bias"] = 0.01 * torch.randn(dim, generator=g)
    return sd


def toy_families(family: str = "multitalk") -> tuple[SpeechFamily, ...]:
    class Family(ToyAdapter):
        @classmethod
        def from_state_dict(cls, sd, dit, *, dtype=None):
            return ToyAdapter.from_state_dict.__func__(ToyAdapter, sd, dit, dtype=dtype, family=family)
    return (SpeechFamily(family, is_toy_file, Family),)


def tiny_i2v_handle(family: str = "multitalk", seed: int = 1) -> WanModelHandle:
    """A tiny I2V DiT (16-token text context) with the toy speech model attached."""
    cfg = replace(wan_config.tiny("i2v", text_dim=TEXT_DIM, clip_dim=16), text_len=16)
    dit = WanDiT(cfg).eval().requires_grad_(False)
    dit.load_state_dict(random_state_dict(cfg, seed=seed))
    dit.attach_audio(ToyAdapter.from_state_dict(toy_state_dict(len(dit.blocks), cfg.dim), dit, family=family))
    return WanModelHandle(dit, cfg.name, CPU)


def toy_audio(family: str, frames: int, seed: int = 2) -> ToyConditioning:
    g = torch.Generator().manual_seed(seed)
    return ToyConditioning(family, torch.randn(frames, FEAT, generator=g))


def tiny_text() -> WanTextEmbeds:
    g = torch.Generator().manual_seed(0)
    return WanTextEmbeds((torch.randn(5, TEXT_DIM, generator=g),), torch.randn(3, TEXT_DIM, generator=g))


def tiny_i2v_embeds(frames: int = 9, width: int = 32, height: int = 32, seed: int = 3) -> WanImageEmbeds:
    g = torch.Generator().manual_seed(seed)
    latent_frames = (frames - 1) // 4 + 1
    y = torch.cat([torch.zeros(4, latent_frames, height // 8, width // 8),
                   torch.randn(16, latent_frames, height // 8, width // 8, generator=g)])
    y[:4, 0] = 1.0
    return WanImageEmbeds(width, height, frames, y=y, clip=torch.randn(1, 257, 16, generator=g))
