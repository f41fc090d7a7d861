"""Anima's text path outside ComfyUI: prompt weights, the two tokenizers, the encoder's outputs."""

from __future__ import annotations

import pytest
import torch
from slipstream.models.anima.text_encoder import find_tokenizer_dirs, load_text_encoder, parse_prompt_weights
from slipstream.models.anima.tiny import write_tiny_anima
from slipstream.models.anima.tokenizers import ByteLevelBPE, Unigram, _bytes_to_unicode

pytestmark = pytest.mark.usefixtures("single_thread")


def test_prompt_weights_follow_comfyui_syntax():
    assert parse_prompt_weights("a girl, (red hair:1.3), ((smile)), \\(not weighted\\)") == [
        ("a girl, ", 1.0), ("red hair", 1.3), (", ", 1.0), ("smile", pytest.approx(1.21)),
        (", (not weighted)", 1.0)]
    assert parse_prompt_weights("(a:0.5) b") == [("a", 0.5), (" b", 1.0)]
    assert parse_prompt_weights("") == []


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("anima_text")
    return root, write_tiny_anima(root)


def test_byte_level_bpe_round_trips_any_text_and_keeps_special_tokens(tiny_files):
    root, _ = tiny_files
    bpe = ByteLevelBPE.from_dir(str(root / "text_encoders" / "qwen25_tokenizer"))
    inverse = {v: k for k, v in bpe.vocab.items()}
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    text = "a character with long hair, 東京 ½ — smiling!\n"
    ids = bpe.encode(text)
    assert bytes(byte_of[c] for i in ids for c in inverse[i]).decode("utf-8") == text
    assert len(ids) < len(text.encode("utf-8"))                       # merges were applied
    pad = bpe.added["<|endoftext|>"]
    assert bpe.encode("hair<|endoftext|>hair") == bpe.encode("hair") + [pad] + bpe.encode("hair")


def test_unigram_prefers_whole_pieces_and_fuses_unknowns(tiny_files):
    root, _ = tiny_files
    t5 = Unigram.from_dir(str(root / "text_encoders" / "t5_tokenizer"))
    ids = t5.encode("a girl")
    assert ids[-1] == t5.eos_id == 1 and len(ids) == 3                 # "▁a", "▁girl", "</s>"
    assert t5.encode("  girl  ", add_eos=False) == t5.encode("girl", add_eos=False)
    unk = t5.encode("ééé", add_eos=False)
    assert unk.count(t5.unk_id) == 1                                  # a run of unknowns is one <unk>


def test_encoder_outputs_states_t5_ids_and_weights(tiny_files):
    root, files = tiny_files
    te = load_text_encoder(str(root / "text_encoders" / files.text_encoder), [str(root / "text_encoders")])
    tokens = te.tokenize("a (girl:1.5)")
    assert tokens.t5_weights == (1.0, 1.5, 1.0) and tokens.t5_ids[-1] == 1
    cond, pooled, extra = te.encode(tokens)
    assert cond.shape == (1, len(tokens.qwen_ids), 32) and pooled is None
    assert extra["t5xxl_ids"].dtype == torch.int32 and extra["t5xxl_weights"].tolist() == [1.0, 1.5, 1.0]
    empty = te.tokenize("")
    assert empty.qwen_ids == (te.qwen_tokenizer.added["<|endoftext|>"],) and empty.t5_ids == (1,)


def test_missing_tokenizer_files_say_where_to_find_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"qwen25_tokenizer, t5_tokenizer.*comfy/text_encoders"):
        find_tokenizer_dirs([str(tmp_path)])
