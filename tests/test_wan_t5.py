"""umT5 encoder + tokenizer: real key layouts at full size (meta), tiny random weights, padding rules."""

from __future__ import annotations

import io
import math

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan import t5 as T
from slipstream.models.wan import tokenizer as TK
from slipstream.models.wan.demo_assets import seeded_state_dict
from slipstream.models.wan.weights import build_on_meta

pytestmark = pytest.mark.usefixtures("single_thread")

CORPUS = ["a cat walks on the beach at sunset", "a dog runs through the snowy forest",
          "cinematic shot of a red car driving fast", "the camera pans slowly over the mountains",
          "two people dance in the rain under neon lights", "close-up of a woman smiling, soft light"]


@pytest.fixture(scope="module")
def spiece_proto() -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 10), model_writer=out, vocab_size=120,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, hard_vocab_limit=False, minloglevel=2)
    return out.getvalue()


@pytest.fixture(scope="module")
def tokenizer(spiece_proto):
    return TK.UMT5Tokenizer(spiece_proto)


def _random_tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    def draw(name: str, shape: torch.Size, noise: torch.Tensor) -> torch.Tensor:
        if "norm" in name:
            return 1.0 + 0.2 * noise
        return noise if "embedding" in name else noise / math.sqrt(shape[1])

    return seeded_state_dict(lambda: T.UMT5Encoder(T.TINY_UMT5), seed, draw)


@pytest.fixture(scope="module")
def tiny_sd():
    return _random_tiny_state_dict()


@pytest.fixture(scope="module")
def encoder(tiny_sd):
    return T.UMT5Encoder.from_state_dict(dict(tiny_sd))


def _to_hf_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names ComfyUI / transformers use for the same tensors (written out independently of the loader)."""
    out = {}
    for key, t in sd.items():
        parts = key.split(".")
        if key == "token_embedding.weight":
            out["shared.weight"] = t
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = t
        else:
            i, rest = parts[1], ".".join(parts[2:])
            block = f"encoder.block.{i}."
            out[block + {
                "attn.q.weight": "layer.0.SelfAttention.q.weight",
                "attn.k.weight": "layer.0.SelfAttention.k.weight",
                "attn.v.weight": "layer.0.SelfAttention.v.weight",
                "attn.o.weight": "layer.0.SelfAttention.o.weight",
                "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
                "norm1.weight": "layer.0.layer_norm.weight",
                "norm2.weight": "layer.1.layer_norm.weight",
                "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
                "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
                "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
            }[rest]] = t
    return out


# ---- full-size architecture ---------------------------------------------------------------------

def test_full_umt5_on_meta_has_the_official_keys_and_shapes():
    sd = build_on_meta(lambda: T.UMT5Encoder()).state_dict()
    assert len(sd) == 242
    assert sum(t.numel() for t in sd.values()) == 5_680_910_336
    assert sd["token_embedding.weight"].shape == (256384, 4096)
    assert sd["norm.weight"].shape == (4096,)
    for i in range(24):
        b = f"blocks.{i}."
        assert sd[b + "norm1.weight"].shape == (4096,) and sd[b + "norm2.weight"].shape == (4096,)
        for p in "qkvo":
            assert sd[b + f"attn.{p}.weight"].shape == (4096, 4096)
        assert sd[b + "ffn.gate.0.weight"].shape == (10240, 4096)
        assert sd[b + "ffn.fc1.weight"].shape == (10240, 4096)
        assert sd[b + "ffn.fc2.weight"].shape == (4096, 10240)
        assert sd[b + "pos_embedding.embedding.weight"].shape == (32, 64)  # every layer owns its bias


def test_hf_names_of_the_full_model_map_onto_it():
    meta = build_on_meta(lambda: T.UMT5Encoder()).state_dict()
    hf = _to_hf_names(meta)
    assert "encoder.block.23.layer.0.SelfAttention.relative_attention_bias.weight" in hf
    encoder = T.UMT5Encoder.from_state_dict(hf)  # meta tensors in, meta model out: no memory used
    assert encoder.config == T.UMT5_XXL
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == {k: tuple(v.shape) for k, v in meta.items()}


# ---- formulas ----------------------------------------------------------------------------------

def test_relative_position_buckets():
    rel = torch.tensor([0, -1, 1, -7, -8, -16, -127, -128, -1000, 7, 8, 16, 200])
    expected = [0, 1, 17, 7, 8, 10, 15, 15, 15, 23, 24, 26, 31]
    # 16 buckets a side; below 8 exact; 8 + floor(log(d/8)/log(16) * 8) above, capped at 15.
    assert T.relative_position_bucket(rel, 32, 128).tolist() == expected


def test_attention_is_unscaled_with_the_position_bias(encoder):
    block = encoder.blocks[0]
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(4))
    bias = block.pos_embedding(block.pos_embedding.buckets(6))
    out = block.attn(x, bias)
    a = block.attn
    q, k, v = (p(x).view(1, 6, 4, 8).transpose(1, 2) for p in (a.q, a.k, a.v))
    probs = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)  # no 1/sqrt(8)
    manual = a.o((probs @ v).transpose(1, 2).reshape(1, 6, 32))
    assert torch.allclose(out, manual, atol=1e-5)


def test_ffn_is_gated_tanh_gelu(encoder):
    ffn = encoder.blocks[1].ffn
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    g = x @ ffn.gate[0].weight.T
    gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    assert torch.allclose(ffn(x), (gelu * (x @ ffn.fc1.weight.T)) @ ffn.fc2.weight.T, atol=1e-5)


def test_layer_norm_is_rms_without_bias(encoder):
    x = torch.randn(2, 32) * 3 + 1
    y = encoder.norm(x)
    assert torch.allclose(y, x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * encoder.norm.weight, atol=1e-5)


# ---- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_pads_to_512_with_eos_and_mask(tokenizer):
    batch = tokenizer(["a cat walks on the beach", "two people dance"])
    assert batch.ids.shape == (2, 512) and batch.ids.dtype == torch.long
    assert batch.mask.shape == (2, 512) and batch.mask.dtype == torch.bool
    for row, n in enumerate(batch.lengths):
        assert batch.ids[row, n - 1] == 1  # EOS closes the prompt
        assert (batch.ids[row, n:] == 0).all() and batch.mask[row, :n].all() and not batch.mask[row, n:].any()
        assert 1 not in batch.ids[row, : n - 1].tolist()
    assert tokenizer.decode(batch.ids[0].tolist()) == "a cat walks on the beach"


def test_tokenizer_truncates_and_cleans(tokenizer, spiece_proto):
    long = tokenizer(" ".join(CORPUS * 40))
    assert long.lengths == (512,) and long.ids[0, -1] == 1 and long.mask.all()
    short_ctx = TK.UMT5Tokenizer(spiece_proto, context_length=8)
    assert short_ctx("the camera pans slowly over the mountains").ids.shape == (1, 8)
    assert tokenizer.encode("a  cat &amp;\n dog") == tokenizer.encode("a cat & dog")


def test_tokenizer_from_comfy_file_tensor_and_from_a_file_beside(tokenizer, spiece_proto, tiny_sd, tmp_path):
    comfy = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file({**_to_hf_names(tiny_sd), "spiece_model": tokenizer.serialize()}, str(comfy))
    from_tensor = TK.load_tokenizer(str(comfy))
    assert from_tensor.encode("a red car") == tokenizer.encode("a red car")

    official = tmp_path / "official" / "models_t5_umt5-xxl-enc-bf16.safetensors"
    (tmp_path / "official" / "google" / "umt5-xxl").mkdir(parents=True)
    save_file(dict(tiny_sd), str(official))
    (tmp_path / "official" / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece_proto)
    assert TK.load_tokenizer(str(official)).encode("a red car") == tokenizer.encode("a red car")

    lonely = tmp_path / "lonely.safetensors"
    save_file(dict(tiny_sd), str(lonely))
    with pytest.raises(CheckpointError, match="spiece.model"):
        TK.load_tokenizer(str(lonely))
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        TK.UMT5Tokenizer(b"definitely not a proto")


# ---- encoder on tokens ---------------------------------------------------------------------------

def test_encoder_on_tokenized_text(encoder, tokenizer):
    batch = tokenizer(["a cat walks on the beach at sunset", "a dog"])
    out = encoder.encode(batch)
    assert out.shape == (2, 512, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    for row, n in enumerate(batch.lengths):
        assert (out[row, n:] == 0).all() and out[row, :n].abs().sum() > 0
    seen = []
    assert torch.equal(encoder.encode(batch, callback=lambda d, t: seen.append((d, t))), out)  # deterministic
    assert seen == [(1, 2), (2, 2)]


def test_padding_does_not_change_real_tokens(encoder, tokenizer, spiece_proto):
    text = "cinematic shot of a red car driving fast"
    padded = encoder.encode(tokenizer(text))
    n = tokenizer(text).lengths[0]
    exact = encoder.encode(TK.UMT5Tokenizer(spiece_proto, context_length=n)(text))
    assert torch.allclose(padded[0, :n], exact[0], atol=1e-5)
    unmasked = encoder(tokenizer(text).ids)  # attending to the pads changes the result
    assert not torch.allclose(unmasked[0, :n], exact[0], atol=1e-3)


def test_bf16_tracks_fp32(tiny_sd, tokenizer):
    batch = tokenizer("two people dance in the rain")
    n = batch.lengths[0]
    ref = T.UMT5Encoder.from_state_dict(dict(tiny_sd)).encode(batch)
    bf16 = T.UMT5Encoder.from_state_dict(dict(tiny_sd), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    out = bf16.encode(batch)
    assert torch.isfinite(out).all() and (out[0, n:] == 0).all()
    assert (out[0, :n] - ref[0, :n]).abs().mean() < 0.05 * ref[0, :n].abs().mean()


def test_token_ids_outside_the_vocabulary_are_refused(encoder):
    with pytest.raises(ValueError, match="out of range"):
        encoder(torch.tensor([[5, 400, 1]]))


# ---- loading -----------------------------------------------------------------------------------

def test_official_and_comfy_files_load_the_same(tiny_sd, tokenizer, tmp_path):
    batch = tokenizer("a cat walks on the beach")
    ref = T.UMT5Encoder.from_state_dict(dict(tiny_sd)).encode(batch)

    official = tmp_path / "official.safetensors"
    save_file(dict(tiny_sd), str(official))
    comfy = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file({**{k: v.half() for k, v in _to_hf_names(tiny_sd).items()}, "spiece_model": tokenizer.serialize()},
              str(comfy))
    allinone = tmp_path / "wan_checkpoint.safetensors"
    save_file({**{"text_encoders.umt5xxl.transformer." + k: v for k, v in _to_hf_names(tiny_sd).items()},
               "vae.conv2.weight": torch.zeros(16, 16, 1, 1, 1)}, str(allinone))

    assert torch.equal(T.UMT5Encoder.from_file(str(official)).encode(batch), ref)
    assert torch.equal(T.UMT5Encoder.from_file(str(allinone)).encode(batch), ref)
    half = T.UMT5Encoder.from_file(str(comfy), dtype=torch.float32)
    assert (half.encode(batch) - ref).abs().max() < 1e-2
    assert T.UMT5Encoder.from_file(str(comfy)).dtype == torch.float16


def test_scaled_fp8_comfy_file_is_dequantized(tiny_sd, tokenizer, tmp_path):
    hf = _to_hf_names(tiny_sd)
    quant = {}
    for k, v in hf.items():
        if k.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")):
            scale = v.abs().max() / 448
            quant[k] = (v / scale).to(torch.float8_e4m3fn)
            quant[k.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            quant[k] = v
    quant["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(quant, str(path))
    batch = tokenizer("a dog runs through the snowy forest")
    ref = T.UMT5Encoder.from_state_dict(dict(tiny_sd)).encode(batch)
    dequantized = T.UMT5Encoder.from_file(str(path), dtype=torch.float32, weight_dtype=torch.float32)
    assert dequantized.blocks[0].attn.q.weight.dtype == torch.float32
    assert (dequantized.encode(batch) - ref).abs().mean() < 0.1 * ref.abs().mean()
    kept = T.UMT5Encoder.from_file(str(path))  # fp8 files stay fp8 (half the memory), compute in bf16
    assert kept.dtype == torch.bfloat16
    q = kept.blocks[0].attn.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale is not None
    assert kept.blocks[0].norm1.weight.dtype == torch.bfloat16
    out = kept.encode(batch)
    assert torch.isfinite(out).all() and (out - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_integer_quantized_weights_are_refused(tiny_sd):
    sd = dict(tiny_sd)
    sd["blocks.0.attn.q.weight"] = torch.zeros(32, 32, dtype=torch.int8)
    with pytest.raises(CheckpointError, match="blocks.0.attn.q.weight' is stored as int8"):
        T.UMT5Encoder.from_state_dict(sd)


def test_missing_or_wrong_tensor_is_named(tiny_sd):
    missing = _to_hf_names(tiny_sd)
    del missing["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    with pytest.raises(CheckpointError, match=r"blocks.1.ffn.fc2.weight"):
        T.UMT5Encoder.from_state_dict(missing)
    wrong = dict(tiny_sd)
    wrong["blocks.0.attn.k.weight"] = torch.zeros(32, 31)
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.k.weight \(32, 31\)"):
        T.UMT5Encoder.from_state_dict(wrong)
    with pytest.raises(CheckpointError, match="not a umT5 text encoder"):
        T.UMT5Encoder.from_state_dict({"decoder.conv1.weight": torch.zeros(1)})


def test_loading_does_not_copy_the_weights(tiny_sd):
    sd = dict(tiny_sd)
    enc = T.UMT5Encoder.from_state_dict(sd)
    assert enc.blocks[1].attn.q.weight.data_ptr() == tiny_sd["blocks.1.attn.q.weight"].data_ptr()
