"""Tiny random-weight Anima assets with the real formats: for tests, demos and benchmarks on a CPU.

`write_tiny_anima(models_root)` writes what the Anima loaders read, under ComfyUI's folder names:
the DiT (`net.`-prefixed keys, like the released file), a Qwen3 text encoder (`model.*` keys), the two
tokenizers in the Hugging Face file formats (a byte-level BPE learned from a few sentences and a
small unigram vocabulary), and a Wan 2.1 VAE at 1/12 width. Outputs are noise; every code path runs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..wan.demo_assets import tiny_vae_state_dict
from .dit import AnimaConfig, AnimaDiT, tiny_config
from .qwen3 import Qwen3Config, Qwen3Encoder
from .tokenizers import _bytes_to_unicode

TINY_QWEN = Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)
TINY_T5_VOCAB = 128
TINY_DIT = tiny_config(model_channels=64, num_blocks=2, num_heads=4, context_dim=32, source_dim=TINY_QWEN.hidden_size,
                       adapter_layers=1, adapter_heads=2, vocab_size=TINY_T5_VOCAB)
_CORPUS = ("a character, a girl with long hair, looking at the viewer, smiling. "
           "masterpiece, best quality, anime style, simple background, full body")


@dataclass(frozen=True)
class TinyAnimaFiles:
    dit: str                  # name under diffusion_models
    text_encoder: str         # name under text_encoders
    vae: str                  # name under vae


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Fill every parameter with N(0, std²) from a seeded generator (norm gains around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_gain = "norm" in name.rsplit(".", 2)[-2]
            p.copy_(1.0 + noise if is_gain else noise)
    return module


def tiny_dit(seed: int = 0, cfg: AnimaConfig = TINY_DIT, std: float = 0.1) -> AnimaDiT:
    return randomize(AnimaDiT(cfg), seed, std).eval().requires_grad_(False)


def _learn_bpe(text: str, merges: int) -> list[tuple[str, str]]:
    """A few byte-level BPE merges learned from `text` (so tiny vocabularies still merge something)."""
    byte_map = _bytes_to_unicode()
    words = Counter(" " + w for w in text.split())
    seqs = {w: [byte_map[b] for b in w.encode()] for w in words}
    learned: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: Counter = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:], strict=False):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        learned.append(best)
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return learned


def write_tiny_tokenizers(text_encoders_dir: Path) -> None:
    """qwen25_tokenizer/ (vocab.json, merges.txt, tokenizer_config.json) and t5_tokenizer/tokenizer.json."""
    byte_map = _bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(byte_map[b] for b in range(256))}
    merges = _learn_bpe(_CORPUS, TINY_QWEN.vocab_size - 256 - 8)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    qwen = text_encoders_dir / "qwen25_tokenizer"
    qwen.mkdir(parents=True, exist_ok=True)
    (qwen / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (qwen / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                     encoding="utf-8")
    config = {"added_tokens_decoder": {str(len(vocab)): {"content": "<|endoftext|>", "special": True}}}
    (qwen / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    pieces = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], ["▁", -2.0]]
    pieces += [[ch, -6.0] for ch in (chr(c) for c in range(33, 127))]
    words = sorted(set(_CORPUS.replace(",", " ").replace(".", " ").split()))
    pieces += [["▁" + w, -3.0 - 0.01 * i] for i, w in enumerate(words)][: TINY_T5_VOCAB - len(pieces)]
    tokenizer = {"version": "1.0", "added_tokens": [{"id": i, "content": p, "special": True}
                                                    for i, p in enumerate(("<pad>", "</s>", "<unk>"))],
                 "model": {"type": "Unigram", "unk_id": 2, "vocab": pieces}}
    t5 = text_encoders_dir / "t5_tokenizer"
    t5.mkdir(parents=True, exist_ok=True)
    (t5 / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")


def write_tiny_anima(models_root: Path, seed: int = 0) -> TinyAnimaFiles:
    """Write the tiny DiT, text encoder (+ tokenizers) and VAE under models_root; returns their names."""
    models_root = Path(models_root)
    files = TinyAnimaFiles("anima_tiny.safetensors", "qwen3_anima_tiny.safetensors", "qwen_image_vae_tiny.safetensors")
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models_root / sub).mkdir(parents=True, exist_ok=True)
    dit = tiny_dit(seed)
    save_file({f"net.{k}": v.contiguous() for k, v in dit.state_dict().items()},
              str(models_root / "diffusion_models" / files.dit))
    qwen = randomize(Qwen3Encoder(TINY_QWEN), seed + 1, std=0.2)
    save_file({k: v.contiguous() for k, v in qwen.state_dict().items()}, str(models_root / "text_encoders" / files.text_encoder))
    write_tiny_tokenizers(models_root / "text_encoders")
    save_file(tiny_vae_state_dict(seed + 2), str(models_root / "vae" / files.vae))
    return files


def write_reference_image(path: Path, size: tuple[int, int] = (384, 512)) -> None:
    """A simple synthetic 'character' (head, hair, body) on a transparent background, as a PNG."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rectangle([w * 0.30, h * 0.40, w * 0.70, h * 0.95], fill=(70, 90, 200, 255))          # dress
    draw.ellipse([w * 0.30, h * 0.08, w * 0.70, h * 0.42], fill=(250, 220, 200, 255))          # face
    draw.pieslice([w * 0.25, h * 0.02, w * 0.75, h * 0.50], 180, 360, fill=(230, 120, 180, 255))  # hair
    draw.ellipse([w * 0.40, h * 0.22, w * 0.46, h * 0.27], fill=(40, 160, 90, 255))            # eyes
    draw.ellipse([w * 0.54, h * 0.22, w * 0.60, h * 0.27], fill=(40, 160, 90, 255))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def prepare_demo(models_root: Path, input_root: Path) -> None:
    """Everything the Anima example workflows name: tiny models and the reference image."""
    write_tiny_anima(Path(models_root))
    write_reference_image(Path(input_root) / "anima_reference.png")
