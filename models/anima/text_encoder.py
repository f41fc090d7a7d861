"""Anima's text path outside ComfyUI: prompt -> (Qwen3 hidden states, T5 ids, T5 weights).

Mirrors what ComfyUI's `AnimaTokenizer` / `AnimaTEModel` produce, so the DiT's adapter receives
the same inputs whichever host built them: the prompt is split by ComfyUI's weight syntax
(`(word:1.2)`, `(word)` = ×1.1, `\\(` escapes); Qwen gets every segment with weight 1.0 and no
special tokens; T5 gets the same segments with their weights, then `</s>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .qwen3 import Qwen3Encoder
from .tokenizers import ByteLevelBPE, Unigram

QWEN_PAD_ID = 151643          # Qwen's <|endoftext|>: what an empty prompt becomes (min length 1)


def parse_prompt_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """ComfyUI's prompt weighting: [(segment, weight)] for '(a:1.3)', nested '((a))' = 1.21, '\\(' literal."""
    text = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    out = [(seg.replace("\0\1", ")").replace("\0\2", "("), w) for seg, w in _weights(text, weight)]
    return [(seg, w) for seg, w in out if seg]


def _split_parentheses(text: str) -> list[str]:
    parts, current, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0 and current:
                parts.append(current)
                current = ""
            current += ch
            depth += 1
        elif ch == ")" and depth > 0:
            depth -= 1
            current += ch
            if depth == 0:
                parts.append(current)
                current = ""
        else:
            current += ch
    if current:
        parts.append(current)
    return parts


def _weights(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for part in _split_parentheses(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner, w = part[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _weights(inner, w)
        else:
            out.append((part, weight))
    return out


@dataclass(frozen=True)
class AnimaTokens:
    qwen_ids: tuple[int, ...]
    t5_ids: tuple[int, ...]
    t5_weights: tuple[float, ...]


@dataclass
class AnimaTextEncoder:
    qwen: Qwen3Encoder
    qwen_tokenizer: ByteLevelBPE
    t5_tokenizer: Unigram

    def tokenize(self, text: str) -> AnimaTokens:
        qwen: list[int] = []
        t5: list[int] = []
        weights: list[float] = []
        for segment, weight in parse_prompt_weights(text):
            qwen += self.qwen_tokenizer.encode(segment)
            ids = self.t5_tokenizer.encode(segment, add_eos=False)
            t5 += ids
            weights += [weight] * len(ids)
        t5.append(self.t5_tokenizer.eos_id)
        weights.append(1.0)
        pad = self.qwen_tokenizer.added.get("<|endoftext|>", QWEN_PAD_ID)
        return AnimaTokens(tuple(qwen or [pad]), tuple(t5), tuple(weights))

    @torch.no_grad()
    def encode(self, tokens: AnimaTokens, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, None, dict[str, torch.Tensor]]:
        """(Qwen3 last hidden states [1, n, hidden], no pooled output, {t5xxl_ids, t5xxl_weights})."""
        ids = torch.tensor([tokens.qwen_ids], device=device)
        cond = self.qwen(ids, dtype=dtype)
        extra = {"t5xxl_ids": torch.tensor(tokens.t5_ids, dtype=torch.int32),
                 "t5xxl_weights": torch.tensor(tokens.t5_weights, dtype=torch.float32)}
        return cond, None, extra


QWEN_TOKENIZER_DIR = "qwen25_tokenizer"     # the folder names ComfyUI ships in comfy/text_encoders/
T5_TOKENIZER_DIR = "t5_tokenizer"


def find_tokenizer_dirs(search_dirs: list[str]) -> tuple[str, str]:
    """(qwen dir, t5 dir): the first `qwen25_tokenizer/` and `t5_tokenizer/` found under search_dirs."""
    import os

    def first(name: str, marker: tuple[str, ...]) -> str | None:
        for root in search_dirs:
            folder = os.path.join(root, name)
            if any(os.path.isfile(os.path.join(folder, m)) for m in marker):
                return folder
        return None

    qwen = first(QWEN_TOKENIZER_DIR, ("vocab.json", "tokenizer.json"))
    t5 = first(T5_TOKENIZER_DIR, ("tokenizer.json",))
    if qwen is None or t5 is None:
        missing = [n for n, d in ((QWEN_TOKENIZER_DIR, qwen), (T5_TOKENIZER_DIR, t5)) if d is None]
        raise FileNotFoundError(
            f"Anima's tokenizer files were not found ({', '.join(missing)}/). Looked in: {', '.join(search_dirs)}. "
            f"Copy ComfyUI's comfy/text_encoders/{QWEN_TOKENIZER_DIR}/ (vocab.json, merges.txt) and "
            f"{T5_TOKENIZER_DIR}/ (tokenizer.json) next to the text encoder file.")
    return qwen, t5


def load_text_encoder(path: str, search_dirs: list[str], dtype: torch.dtype | None = None,
                      device: torch.device | str = "cpu") -> AnimaTextEncoder:
    """Qwen3 weights from `path` plus the tokenizers found in `search_dirs`."""
    qwen_dir, t5_dir = find_tokenizer_dirs(search_dirs)
    model = Qwen3Encoder.from_file(path, dtype=dtype, device=device)
    return AnimaTextEncoder(model, ByteLevelBPE.from_dir(qwen_dir), Unigram.from_dir(t5_dir))
