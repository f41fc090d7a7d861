"""Tiny random wav2vec2 checkpoints with the real Hugging Face key names, for any test that needs a speech encoder.

    path = write_tiny_wav2vec2(tmp_path / "tiny-wav2vec2.safetensors")   # or .bin (pickled, torch.save)
    encoder = tiny_speech_encoder(tmp_path)                              # loaded through load_speech_encoder

The structure is the real one (7-layer conv stack shrunk to 3, GroupNorm on the first conv layer,
feature projection, weight-normed positional conv, post-LN transformer), only narrower and shallower:
TINY_BASE. `variant="large"` gives the layer-norm / pre-LN ("stable layer norm") structure with conv
biases. The tensors are written by name from the architecture, not through the model under test.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_CONV_DIM = (32, 32, 32)
TINY_CONV_KERNEL = (10, 3, 2)
TINY_CONV_STRIDE = (5, 2, 2)     # 20 samples per frame, 30 samples of receptive field


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 128            # 2 heads of 64
    layers: int = 2
    ffn: int = 256
    pos_kernel: int = 16
    pos_groups: int = 4
    conv_dim: tuple[int, ...] = TINY_CONV_DIM
    conv_kernel: tuple[int, ...] = TINY_CONV_KERNEL
    conv_stride: tuple[int, ...] = TINY_CONV_STRIDE


TINY_BASE = TinySpec()


def tiny_wav2vec2_state_dict(spec: TinySpec = TINY_BASE, *, variant: str = "base", weight_norm: str = "weight_g",
                             prefix: str = "", masked_spec_embed: bool = True, lm_head: int = 0,
                             seed: int = 0) -> dict[str, torch.Tensor]:
    """HF Wav2Vec2Model tensors (fp32) for `spec`. `weight_norm`: "weight_g" (older files),
    "parametrizations" (newer torch) or "fused" (a plain `conv.weight`). `lm_head` > 0 adds a CTC head of
    that many letters outside the prefix, as Wav2Vec2ForCTC files have."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm(name: str, width: int) -> None:
        sd[f"{name}.weight"] = 1.0 + rnd(width, scale=0.1)
        sd[f"{name}.bias"] = rnd(width, scale=0.1)

    large = variant == "large"
    sd: dict[str, torch.Tensor] = {}
    cin = 1
    for i, (cout, k) in enumerate(zip(spec.conv_dim, spec.conv_kernel, strict=True)):
        sd[f"feature_extractor.conv_layers.{i}.conv.weight"] = rnd(cout, cin, k, scale=(cin * k) ** -0.5)
        if large:
            sd[f"feature_extractor.conv_layers.{i}.conv.bias"] = rnd(cout, scale=0.1)
        if large or i == 0:
            norm(f"feature_extractor.conv_layers.{i}.layer_norm", cout)
        cin = cout
    d = spec.hidden
    norm("feature_projection.layer_norm", spec.conv_dim[-1])
    sd["feature_projection.projection.weight"] = rnd(d, spec.conv_dim[-1], scale=spec.conv_dim[-1] ** -0.5)
    sd["feature_projection.projection.bias"] = rnd(d, scale=0.1)
    pos = "encoder.pos_conv_embed.conv."
    v = rnd(d, d // spec.pos_groups, spec.pos_kernel, scale=0.05)
    gain = 0.5 + torch.rand(1, 1, spec.pos_kernel, generator=g)
    if weight_norm == "weight_g":
        sd[pos + "weight_g"], sd[pos + "weight_v"] = gain, v
    elif weight_norm == "parametrizations":
        sd[pos + "parametrizations.weight.original0"], sd[pos + "parametrizations.weight.original1"] = gain, v
    elif weight_norm == "fused":
        sd[pos + "weight"] = v * (gain / v.norm(dim=(0, 1), keepdim=True))
    else:
        raise ValueError(f"unknown weight_norm layout {weight_norm!r}")
    sd[pos + "bias"] = rnd(d, scale=0.1)
    norm("encoder.layer_norm", d)
    for n in range(spec.layers):
        base = f"encoder.layers.{n}."
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{base}attention.{p}.weight"] = rnd(d, d, scale=d ** -0.5)
            sd[f"{base}attention.{p}.bias"] = rnd(d, scale=0.1)
        norm(base + "layer_norm", d)
        sd[base + "feed_forward.intermediate_dense.weight"] = rnd(spec.ffn, d, scale=d ** -0.5)
        sd[base + "feed_forward.intermediate_dense.bias"] = rnd(spec.ffn, scale=0.1)
        sd[base + "feed_forward.output_dense.weight"] = rnd(d, spec.ffn, scale=spec.ffn ** -0.5)
        sd[base + "feed_forward.output_dense.bias"] = rnd(d, scale=0.1)
        norm(base + "final_layer_norm", d)
    if masked_spec_embed:
        sd["masked_spec_embed"] = torch.rand(d, generator=g)
    sd = {prefix + k: t.contiguous() for k, t in sd.items()}
    if lm_head:
        sd["lm_head.weight"] = rnd(lm_head, d, scale=0.1)
        sd["lm_head.bias"] = rnd(lm_head, scale=0.1)
    return sd


def write_tiny_wav2vec2(path: str | Path, spec: TinySpec = TINY_BASE, *, dtype: torch.dtype = torch.float32,
                        **options) -> str:
    """Write `tiny_wav2vec2_state_dict(spec, **options)` to `path`: safetensors, or a pickled state dict
    (torch.save) for .bin / .pth / .pt. Returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype) for k, v in tiny_wav2vec2_state_dict(spec, **options).items()}
    if path.suffix.lower() in (".bin", ".pth", ".pt"):
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file
        save_file(sd, str(path))
    return str(path)


def tiny_speech_encoder(directory: str | Path | None = None, name: str = "tiny-wav2vec2",
                        normalize: bool | None = None, **options):
    """A SpeechEncoder loaded (through load_speech_encoder) from a tiny file written into `directory`
    (a fresh temporary folder when None). `normalize` as load_speech_encoder's; `options` go to the writer."""
    from slipstream.models.audio import load_speech_encoder

    folder = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="tiny-wav2vec2-"))
    path = write_tiny_wav2vec2(folder / f"{name}.safetensors", **options)
    return load_speech_encoder(path, normalize=normalize)


def hf_config_kwargs(spec: TinySpec = TINY_BASE, variant: str = "base") -> dict:
    """transformers.Wav2Vec2Config arguments describing the same tiny model (dropouts off)."""
    large = variant == "large"
    return dict(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.hidden // 64,
                intermediate_size=spec.ffn, conv_dim=spec.conv_dim, conv_kernel=spec.conv_kernel,
                conv_stride=spec.conv_stride, conv_bias=large, feat_extract_norm="layer" if large else "group",
                num_conv_pos_embeddings=spec.pos_kernel, num_conv_pos_embedding_groups=spec.pos_groups,
                do_stable_layer_norm=large, hidden_act="gelu", feat_extract_activation="gelu",
                layer_norm_eps=1e-5, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.05)
