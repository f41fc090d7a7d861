"""Anima's DiT and Qwen3 load from a file through the streaming loader (models/common/loading.py):
the same model as loading the whole state dict first, read tensor by tensor, never the file whole."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from slipstream.models.anima import text_encoder as anima_text
from slipstream.models.anima.dit import AnimaDiT
from slipstream.models.anima.qwen3 import Qwen3Encoder
from slipstream.models.anima.tiny import TINY_QWEN, randomize, tiny_dit
from slipstream.models.checkpoint import CheckpointError, load_state_dict
from slipstream.models.common import loading, state_dict

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def streamed(monkeypatch):
    """The keys the streaming reader read, and a guard that nothing loads the whole file."""
    keys: list[str] = []
    real = loading.read_safetensors

    def counting(path, wanted, transient=None, out=None):
        wanted = list(wanted)
        keys.extend(wanted)
        return real(path, wanted, transient, out)

    monkeypatch.setattr(state_dict, "read_safetensors", counting)
    monkeypatch.setattr(state_dict, "load_state_dict", lambda *a, **k: pytest.fail("the whole file was loaded"))
    return keys


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_dit_from_file_streams_and_equals_the_state_dict_load(tmp_path, streamed, dtype):
    model = tiny_dit(seed=4)
    sd = {f"net.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd["net.pos_embedder.seq"] = torch.zeros(3)            # a non-model tensor some files carry
    path = str(tmp_path / "anima.safetensors")
    save_file(sd, path)
    loaded = AnimaDiT.from_file(path, dtype=dtype)
    assert sorted(streamed) == sorted(f"net.{k}" for k in model.state_dict())   # each model tensor once
    reference = AnimaDiT.from_state_dict(load_state_dict(path), dtype=dtype)
    _same_tensors(loaded, reference)
    assert loaded.config == model.config and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def test_dit_from_file_names_the_file_in_shape_errors(tmp_path, streamed):
    sd = tiny_dit().state_dict()
    sd["blocks.0.cross_attn.k_proj.weight"] = torch.zeros(3, 3)
    path = str(tmp_path / "broken.safetensors")
    save_file(sd, path)
    with pytest.raises(CheckpointError, match="Wrong shape") as err:
        AnimaDiT.from_file(path)
    assert "broken.safetensors" in str(err.value)
    assert not streamed                                     # refused from the header, before any read


def test_text_encoder_streams_its_weights(tmp_path, streamed, monkeypatch):
    enc = randomize(Qwen3Encoder(TINY_QWEN), 5, std=0.2)
    path = str(tmp_path / "qwen.safetensors")
    save_file({**{k: v.contiguous() for k, v in enc.state_dict().items()}, "lm_head.weight": torch.zeros(2, 2)}, path)
    loaded = Qwen3Encoder.from_file(path, dtype=torch.bfloat16)
    assert "lm_head.weight" not in streamed and len(streamed) == len(enc.state_dict())
    _same_tensors(loaded, Qwen3Encoder.from_state_dict(load_state_dict(path), dtype=torch.bfloat16))

    seen = []
    monkeypatch.setattr(anima_text, "find_tokenizer_dirs", lambda dirs: ("q", "t"))
    monkeypatch.setattr(anima_text.ByteLevelBPE, "from_dir", classmethod(lambda cls, d: seen.append(d)))
    monkeypatch.setattr(anima_text.Unigram, "from_dir", classmethod(lambda cls, d: seen.append(d)))
    streamed.clear()
    te = anima_text.load_text_encoder(path, [str(tmp_path)])
    assert len(streamed) == len(enc.state_dict()) and seen == ["q", "t"]
    _same_tensors(te.qwen, enc)
