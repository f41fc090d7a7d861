"""The umT5 SentencePiece tokenizer, from wherever the user's files keep it.

ComfyUI's text-encoder files carry the SentencePiece model proto inside the checkpoint, as a
uint8 tensor named `spiece_model`; official/kijai setups keep `spiece.model` in a folder
(`google/umt5-xxl/`, `T5_tokenizer/`). `load_tokenizer` tries the checkpoint first, then the files
beside it, so a user never has to download a tokenizer separately when they have either.

Output convention (official Wan, ComfyUI): tokens + EOS, truncated to the context length (EOS kept
last), padded with id 0 to exactly the context length, with a mask that marks the real tokens.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..checkpoint import SAFETENSORS_EXTS, CheckpointError, load_state_dict, read_safetensors_header

CONTEXT_LENGTH = 512
PAD_ID = 0
SPIECE_KEY = "spiece_model"
# Where tokenizer files sit relative to a text-encoder checkpoint, in the layouts people use.
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "google/umt5-xxl/spiece.model", "umt5-xxl/spiece.model",
                   "umt5_xxl/spiece.model", "T5_tokenizer/spiece.model", "configs/T5_tokenizer/spiece.model")


@dataclass(frozen=True)
class TokenBatch:
    """ids [B,L] int64, mask [B,L] bool (True = real token), lengths = real tokens incl. EOS."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: tuple[int, ...]


def clean_prompt(text: str) -> str:
    """HTML entities decoded and whitespace collapsed, as the official pipeline cleans prompts."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """Text -> umT5 token ids (SentencePiece, no BOS, EOS appended)."""

    def __init__(self, model_proto: bytes, context_length: int = CONTEXT_LENGTH):
        import sentencepiece

        if context_length < 1:
            raise ValueError(f"context length must be at least 1, got {context_length}")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=bytes(model_proto))
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants for bad protos
            raise CheckpointError(f"The tokenizer data is not a SentencePiece model ({exc}).") from exc
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise CheckpointError("The SentencePiece model defines no end-of-sequence token; it is not umT5's tokenizer.")
        self.context_length = context_length
        self.vocab_size = self._sp.get_piece_size()

    # ---- sources -------------------------------------------------------------------------------

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, context_length: int = CONTEXT_LENGTH) -> UMT5Tokenizer:
        """From ComfyUI's `spiece_model` uint8 tensor."""
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise CheckpointError(f"'{SPIECE_KEY}' should be a 1-D uint8 tensor, got {tensor.dtype} {tuple(tensor.shape)}.")
        return cls(tensor.cpu().numpy().tobytes(), context_length)

    @classmethod
    def from_file(cls, path: str, context_length: int = CONTEXT_LENGTH) -> UMT5Tokenizer:
        """From a `spiece.model` file (or a folder holding one)."""
        if os.path.isdir(path):
            found = next((os.path.join(path, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))), None)
            if found is None:
                raise CheckpointError(f"{path}: no SentencePiece tokenizer file ({', '.join(TOKENIZER_FILES[:2])}) in this folder.")
            path = found
        with open(path, "rb") as f:
            return cls(f.read(), context_length)

    def serialize(self) -> torch.Tensor:
        """The model proto as ComfyUI stores it (a uint8 tensor for the `spiece_model` key)."""
        return torch.frombuffer(bytearray(self._sp.serialized_model_proto()), dtype=torch.uint8)

    # ---- tokenizing ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, EOS last, at most `context_length` ids."""
        ids = self._sp.encode(clean_prompt(text), out_type=int)[: self.context_length - 1]
        return ids + [self.eos_id]

    def __call__(self, prompts: str | Sequence[str]) -> TokenBatch:
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self.encode(p) for p in prompts]
        ids = torch.full((len(rows), self.context_length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), self.context_length), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return TokenBatch(ids=ids, mask=mask, lengths=tuple(len(r) for r in rows))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([i for i in ids if i not in (PAD_ID, self.eos_id)])


def find_tokenizer_file(checkpoint_path: str) -> str | None:
    """A tokenizer file beside a checkpoint: `<name>.spiece.model`, `spiece.model`, known sub-folders."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    for name in (f"{stem}.spiece.model", f"{stem}.model", *TOKENIZER_FILES):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _spiece_key(keys) -> str | None:
    """The embedded tokenizer's key under any prefix (all-in-one files nest the text encoder)."""
    return next((k for k in keys if k == SPIECE_KEY or k.endswith("." + SPIECE_KEY)), None)


def tokenizer_from_state_dict(sd: Mapping[str, torch.Tensor], context_length: int = CONTEXT_LENGTH
                              ) -> UMT5Tokenizer | None:
    """The tokenizer embedded in a (ComfyUI) text-encoder state dict, under any prefix; None if absent."""
    key = _spiece_key(sd)
    return None if key is None else UMT5Tokenizer.from_tensor(sd[key], context_length)


def load_tokenizer(checkpoint_path: str, sd: Mapping[str, torch.Tensor] | None = None,
                   context_length: int = CONTEXT_LENGTH) -> UMT5Tokenizer:
    """The umT5 tokenizer for a text-encoder checkpoint: embedded `spiece_model` first, then a file beside it.

    `sd` (the already loaded state dict) avoids reading the checkpoint again.
    """
    if sd is not None:
        tok = tokenizer_from_state_dict(sd, context_length)
        if tok is not None:
            return tok
    elif checkpoint_path.lower().endswith(SAFETENSORS_EXTS):
        key = _spiece_key(read_safetensors_header(checkpoint_path)[0])
        if key is not None:
            return UMT5Tokenizer.from_tensor(load_state_dict(checkpoint_path, keys=[key])[key], context_length)
    beside = find_tokenizer_file(checkpoint_path)
    if beside is not None:
        return UMT5Tokenizer.from_file(beside, context_length)
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    raise CheckpointError(
        f"No umT5 tokenizer for {os.path.basename(checkpoint_path)}: the file has no '{SPIECE_KEY}' tensor "
        f"(ComfyUI's umt5_xxl_*.safetensors files do) and there is no spiece.model beside it in {folder}. "
        "Use ComfyUI's umT5 file, or put spiece.model from google/umt5-xxl next to the checkpoint.")
