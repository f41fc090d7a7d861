"""Wan 2.1/2.2 DiTs from GGUF files: the block Linears keep their quantized weights.

GGUF DiT files (ComfyUI-GGUF's converter, the ones on Hugging Face as `wan2.1-*-Q4_K_M.gguf`)
store the official tensor names, optionally under `model.diffusion_model.`, with
`general.architecture = "wan"`. We detect the config from the shapes exactly as for safetensors,
then build the model on `meta` and give every block Linear whose weight is quantized a
`GGUFLinear`, which keeps the packed bytes and expands them per layer at run time. Everything
else (embeddings, head, norms, modulation, biases; float-stored block weights) is dequantized once
into the compute dtype, as the safetensors loader stores it — those are a few percent of the
weights, and the model's compute dtype is read from the text embedding.

The result is an ordinary `WanDiT`: block swap flattens the packed weights like any others, and
LoRA merging goes through GGUFLinear's dequantize/requantize pair.
"""

from __future__ import annotations

import logging

import torch

from .checkpoint import CheckpointError, check_state_dict
from .gguf_build import default_compute_dtype, describe_types, fill_from_gguf
from .gguf_file import GGUFFile
from .wan.config import detect_config, strip_dit_prefix
from .wan.dit import WanDiT

log = logging.getLogger("slipstream.gguf")

# general.architecture values of Wan DiT files; None: files from converters that write none.
WAN_ARCHITECTURES = ("wan", None)


def load_wan_dit_gguf(path: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None, *,
                      num_heads: int | None = None, attention_backend: str = "auto") -> WanDiT:
    """Load a GGUF Wan DiT. `dtype` is the compute dtype (default: bf16 for quantized files, else the
    file's float type). Raises CheckpointError for another architecture, a damaged file or a
    tensor type that cannot be dequantized."""
    file = GGUFFile(path)
    if file.architecture not in WAN_ARCHITECTURES:
        raise CheckpointError(f"{path}: this GGUF holds a '{file.architecture}' model, not a Wan diffusion model. "
                              "Pick a Wan 2.1/2.2 DiT .gguf (e.g. wan2.1-t2v-14b-Q4_K_M.gguf); text encoders "
                              "go into the Wan text-encoder loader.")
    tensors, _ = strip_dit_prefix(file.tensors, path)
    shapes = {k: t.shape for k, t in tensors.items()}
    config = detect_config(shapes, None, num_heads, path)
    model = WanDiT.build_meta(config, attention_backend)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(expected, {k: torch.empty(s, device="meta") for k, s in shapes.items()},
                     f"the {config.name} Wan DiT ({path})")
    compute = dtype or default_compute_dtype(tensors["blocks.0.self_attn.q.weight"].qtype)
    block_linears = [key[: -len(".weight")] for key in model.quantizable_keys()]
    packed = fill_from_gguf(model, tensors, block_linears, compute, device)
    log.info("GGUF %s: %s; %d block Linears dequantize at run time", path.rsplit("/", 1)[-1],
             describe_types(file.type_counts()), packed)
    return model

