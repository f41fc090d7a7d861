"""The two tokenizers Anima's text path needs, read from the standard Hugging Face files, in pure Python.

- `ByteLevelBPE`: Qwen2/Qwen3's byte-level BPE (`vocab.json` + `merges.txt`, or a `tokenizer.json`
  with a BPE model), with the Qwen2 pre-tokenizer and added special tokens.
- `Unigram`: T5's SentencePiece-unigram model as stored in `tokenizer.json` (Viterbi over piece
  scores, `▁` word boundaries, `</s>` appended).

Why not `tokenizers`/`transformers`: neither is a dependency of this pack, and ComfyUI only needs
these files, which it ships. Two approximations are documented where they occur: Python's `re` has
no `\\p{L}`/`\\p{N}`, so letters/digits use the closest `re` classes; T5's precompiled normaliser is
approximated by NFKC. Both agree with the reference tokenizers on ordinary prompt text.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def _qwen_split() -> re.Pattern:
    """Qwen2's pre-tokenizer pattern in Python `re`, which has no \\p{L} / \\p{N}.

    Every alphanumeric character is a letter or a number, and `\\d` covers the decimal digits, so
    \\p{N} = \\d plus the other numerics (categories Nl, No: "½", "²", "Ⅻ"), listed once here, and
    \\p{L} = alphanumerics that are neither.
    """
    other_numerics = "".join(chr(c) for c in range(0x110000)
                             if unicodedata.category(chr(c)) in ("Nl", "No"))
    extra = re.escape(other_numerics)
    letter = rf"[^\W\d_{extra}]"
    number = rf"[\d{extra}]"
    not_letter_number = r"(?:[^\w]|_)"
    return re.compile(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
        rf"|(?![\r\n]){not_letter_number}?{letter}+"
        rf"|{number}"
        rf"| ?(?:(?!\s){not_letter_number})+[\r\n]*"
        r"|\s*[\r\n]+"
        r"|\s+(?!\S)"
        r"|\s+"
    )


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


class TokenizerFileError(ValueError):
    """Tokenizer files that are missing or not in the expected format."""


class ByteLevelBPE:
    """Byte-level BPE (GPT-2 family, Qwen2/Qwen3 vocabularies)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added: dict[str, int] | None = None):
        self.vocab = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.added = dict(added or {})
        self._byte_map = _bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}
        self._special = (re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
                                    + ")") if self.added else None)

    @classmethod
    def from_dir(cls, folder: str) -> ByteLevelBPE:
        """vocab.json + merges.txt (+ tokenizer_config.json added tokens), or a BPE tokenizer.json."""
        tj = os.path.join(folder, "tokenizer.json")
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
            with open(vocab_path, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merges_path, encoding="utf-8") as f:
                merges = [tuple(line.split()) for line in f.read().splitlines()
                          if line and not line.startswith("#version") and len(line.split()) == 2]
            added = _added_tokens_from_config(os.path.join(folder, "tokenizer_config.json"))
            return cls(vocab, merges, added)
        if os.path.isfile(tj):
            with open(tj, encoding="utf-8") as f:
                data = json.load(f)
            model = data.get("model", {})
            if model.get("type") != "BPE":
                raise TokenizerFileError(f"{tj}: expected a BPE model, found {model.get('type')!r}")
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
            return cls(model["vocab"], merges, added)
        raise TokenizerFileError(f"{folder}: no vocab.json + merges.txt or tokenizer.json for the Qwen tokenizer")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pieces = self._special.split(text) if self._special else [text]
        for piece in pieces:
            if not piece:
                continue
            if piece in self.added:
                ids.append(self.added[piece])
                continue
            for word in _qwen_split().findall(unicodedata.normalize("NFC", piece)):
                ids.extend(self._encode_word(word))
        return ids

    def _encode_word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [self._byte_map[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            best = min(((self.ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))),
                       key=lambda r: (r[0] is None, r[0] if r[0] is not None else 0, r[1]))
            if best[0] is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        try:
            out = [self.vocab[p] for p in parts]
        except KeyError as exc:
            raise TokenizerFileError(f"the Qwen vocabulary lacks the byte-level piece {exc}; the files do not match") from exc
        if len(self._cache) < 65536:
            self._cache[word] = out
        return out


def _added_tokens_from_config(path: str) -> dict[str, int]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {v["content"]: int(k) for k, v in data.get("added_tokens_decoder", {}).items()}


@dataclass
class Unigram:
    """SentencePiece unigram as in T5's tokenizer.json; encode() appends the `</s>` id like T5's template."""

    pieces: dict[str, tuple[int, float]]
    unk_id: int
    eos_id: int
    max_piece_len: int

    @classmethod
    def from_dir(cls, folder: str) -> Unigram:
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerFileError(f"{folder}: no tokenizer.json for the T5 tokenizer")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model", {})
        if model.get("type") != "Unigram":
            raise TokenizerFileError(f"{path}: expected a Unigram model, found {model.get('type')!r}")
        pieces = {piece: (i, float(score)) for i, (piece, score) in enumerate(model["vocab"])}
        added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
        eos = added.get("</s>", pieces.get("</s>", (1, 0.0))[0])
        return cls(pieces, int(model.get("unk_id") or 0), int(eos), max(len(p) for p in pieces))

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        ids: list[int] = []
        for word in self._pretokenize(text):
            ids.extend(self._viterbi(word))
        return ids + [self.eos_id] if add_eos else ids

    @staticmethod
    def _pretokenize(text: str) -> list[str]:
        # T5's normaliser (precompiled NFKC-like map, strip right, "  +" -> "▁") then Metaspace.
        text = unicodedata.normalize("NFKC", text)
        text = re.sub(r"[\t\n\r\f\v]", " ", text).rstrip()
        text = re.sub(r" {2,}", "▁", text)
        if not text:
            return []
        text = text.replace(" ", "▁")
        text = text if text.startswith("▁") else "▁" + text
        return [w for w in re.split(r"(?=▁)", text) if w]

    def _viterbi(self, word: str) -> list[int]:
        n = len(word)
        best = [(0.0, -1, -1)] + [(-float("inf"), -1, -1)] * n     # (score, start, piece id)
        unk_penalty = min(s for _, s in self.pieces.values()) - 10.0
        for end in range(1, n + 1):
            for start in range(max(0, end - self.max_piece_len), end):
                if best[start][0] == -float("inf"):
                    continue
                hit = self.pieces.get(word[start:end])
                if hit is not None:
                    score = best[start][0] + hit[1]
                    if score > best[end][0]:
                        best[end] = (score, start, hit[0])
            if best[end][0] == -float("inf"):          # no piece ends here: one unknown character
                best[end] = (best[end - 1][0] + unk_penalty, end - 1, self.unk_id)
        out = []
        end = n
        while end > 0:
            _, start, piece = best[end]
            out.append(piece)
            end = start
        out.reverse()
        # SentencePiece fuses runs of unknown characters into one <unk>.
        fused = [t for i, t in enumerate(out) if not (t == self.unk_id and i and out[i - 1] == self.unk_id)]
        return fused
