"""The umT5 text encoder from GGUF files (llama.cpp's T5 naming), attention and FFN weights kept packed.

GGUF text encoders (`umt5-xxl-encoder-Q8_0.gguf` and the like) are written by llama.cpp's
converter: `general.architecture` is "t5" or "t5encoder" and tensors use its names —
`token_embd`, `enc.blk.N.attn_q/k/v/o`, `attn_rel_b` (umT5: one position bias per layer),
`attn_norm`, `ffn_gate/up/down`, `ffn_norm`, `enc.output_norm`. They are renamed to our official
module names; the Linears of every block keep their quantized weights (`GGUFLinear`), the token
embedding, norms and position biases are expanded into the compute dtype at load (an embedding is
looked up, not multiplied, so it cannot stay packed).

The tokenizer is not rebuilt from the file's vocabulary: a `spiece.model` from google/umt5-xxl
beside the .gguf is used, as for the official .pth checkpoints.
"""

from __future__ import annotations

import logging
import re

import torch

from .checkpoint import CheckpointError, check_state_dict
from .gguf_build import default_compute_dtype, describe_types, fill_from_gguf
from .gguf_file import GGUFFile, GGUFTensor
from .wan.t5 import UMT5Encoder
from .wan.weights import build_on_meta, rename

log = logging.getLogger("slipstream.gguf")

T5_ARCHITECTURES = ("t5", "t5encoder")

# llama.cpp's T5 names -> our official umT5 names.
_LLAMA_CPP_NAMES = [
    (re.compile(r"^token_embd\.weight$"), "token_embedding.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.attn_([qkvo])\.weight$"), r"blocks.\1.attn.\2.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.attn_rel_b\.weight$"), r"blocks.\1.pos_embedding.embedding.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.attn_norm\.weight$"), r"blocks.\1.norm1.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_norm\.weight$"), r"blocks.\1.norm2.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_gate\.weight$"), r"blocks.\1.ffn.gate.0.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_up\.weight$"), r"blocks.\1.ffn.fc1.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_down\.weight$"), r"blocks.\1.ffn.fc2.weight"),
    (re.compile(r"^enc\.output_norm\.weight$"), "norm.weight"),
]
# A whole T5's decoder and LM head: not part of the encoder.
_UNUSED = re.compile(r"^(dec\.|output\.weight$)")


def umt5_tensors(file: GGUFFile) -> dict[str, GGUFTensor]:
    """The encoder's tensors under official names; CheckpointError for another architecture."""
    if file.architecture not in T5_ARCHITECTURES:
        raise CheckpointError(f"{file.path}: this GGUF holds a '{file.architecture}' model, not the umT5 text "
                              "encoder. Pick a umT5-XXL encoder .gguf (e.g. umt5-xxl-encoder-Q8_0.gguf); "
                              "diffusion models go into the Wan Model Loader.")
    return {rename(name, _LLAMA_CPP_NAMES): tensor for name, tensor in file.tensors.items()
            if not _UNUSED.match(name)}


def load_umt5_gguf(path: str, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> UMT5Encoder:
    """Load a GGUF umT5 encoder; `dtype` is the compute dtype (default bf16 for quantized files)."""
    file = GGUFFile(path)
    tensors = umt5_tensors(file)
    shapes = {k: t.shape for k, t in tensors.items()}
    config = UMT5Encoder.config_from_shapes(shapes)
    model = build_on_meta(lambda: UMT5Encoder(config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(expected, {k: torch.empty(s, device="meta") for k, s in shapes.items()},
                     f"{UMT5Encoder.WHAT} ({path})")
    linears = [name for name, module in model.named_modules()
               if name.startswith("blocks.") and isinstance(module, torch.nn.Linear)]
    compute = dtype or default_compute_dtype(tensors["blocks.0.attn.q.weight"].qtype)
    packed = fill_from_gguf(model, tensors, linears, compute, device)
    log.info("GGUF %s: %s; %d Linears dequantize at run time", path.rsplit("/", 1)[-1],
             describe_types(file.type_counts()), packed)
    return model
