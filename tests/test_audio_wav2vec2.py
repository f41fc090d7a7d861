"""The pure-torch wav2vec2 against transformers' Wav2Vec2Model on identical tiny random weights, the
checkpoint layouts it loads (weight-norm key styles, `wav2vec2.` prefix, CTC / pre-training heads,
safetensors and pickled .bin), the errors for bad files, and the key table of the full-size models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from slipstream.models.audio import SpeechEncoder, Wav2Vec2, load_speech_encoder, normalization_for
from slipstream.models.audio.wav2vec2 import WAV2VEC2_BASE, _recipe
from slipstream.models.checkpoint import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from hf_wav2vec2 import hf_model  # noqa: E402
from speech_fixtures import (  # noqa: E402
    TINY_BASE,
    tiny_speech_encoder,
    tiny_wav2vec2_state_dict,
    write_tiny_wav2vec2,
)


def _max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.mark.parametrize(("variant", "weight_norm"), [("base", "weight_g"), ("base", "parametrizations"),
                                                      ("large", "weight_g")])
def test_matches_transformers_on_every_hidden_state(tmp_path, variant, weight_norm):
    sd = tiny_wav2vec2_state_dict(variant=variant, weight_norm=weight_norm, seed=3)
    hf = hf_model(sd, variant)
    path = write_tiny_wav2vec2(tmp_path / "w.safetensors", variant=variant, weight_norm=weight_norm, seed=3)
    encoder = load_speech_encoder(path)
    assert encoder.config.do_stable_layer_norm == (variant == "large")
    wave = torch.randn(2, 1234, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(wave, output_hidden_states=True)
    ours = encoder(wave)
    assert len(ours) == TINY_BASE.layers + 1
    # Hidden states as transformers 4.x reports them: every layer's input, then the (pre-LN: final-normed) output.
    expected = list(ref.hidden_states[:-1]) + [ref.last_hidden_state]
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        assert a.shape == b.shape, i
        assert _max_rel(a, b) <= 1e-4, (i, _max_rel(a, b))


def test_fused_positional_weight_and_ctc_head_under_prefix(tmp_path):
    """A Wav2Vec2ForCTC file (wav2vec2. prefix, lm_head) and a plain-weight positional conv load the same model."""
    plain = load_speech_encoder(write_tiny_wav2vec2(tmp_path / "a.safetensors", seed=5))
    ctc = load_speech_encoder(write_tiny_wav2vec2(tmp_path / "wav2vec2-base-960h.safetensors", seed=5,
                                                  prefix="wav2vec2.", lm_head=32, weight_norm="fused"))
    wave = torch.randn(1, 900)
    for a, b in zip(plain(wave), ctc(wave), strict=True):
        assert _max_rel(a, b) <= 1e-5
    assert ctc.expects_normalized and ctc.name == "wav2vec2-base-960h"


def test_pretraining_heads_are_skipped(tmp_path):
    sd = tiny_wav2vec2_state_dict(prefix="wav2vec2.", seed=2)
    sd["quantizer.codevectors"] = torch.zeros(1, 8, 16)
    sd["quantizer.weight_proj.weight"] = torch.zeros(8, 32)
    sd["project_q.weight"] = torch.zeros(16, 16)
    sd["project_hid.weight"] = torch.zeros(16, 128)
    from safetensors.torch import save_file
    path = tmp_path / "chinese-wav2vec2-base.safetensors"
    save_file(sd, str(path))
    encoder = load_speech_encoder(str(path))
    assert isinstance(encoder, SpeechEncoder)
    assert not encoder.expects_normalized   # chinese-wav2vec2-base's preprocessor does not normalise


def test_pickled_bin_matches_safetensors(tmp_path):
    a = load_speech_encoder(write_tiny_wav2vec2(tmp_path / "pytorch_model.bin", seed=4, prefix="wav2vec2."))
    b = load_speech_encoder(write_tiny_wav2vec2(tmp_path / "model.safetensors", seed=4))
    wave = torch.randn(1, 700)
    for x, y in zip(a(wave), b(wave), strict=True):
        assert torch.equal(x, y)
    assert a.name == "pytorch_model"


def test_dtype_and_no_masked_spec_embed(tmp_path):
    path = write_tiny_wav2vec2(tmp_path / "w.safetensors", masked_spec_embed=False, dtype=torch.float16)
    enc = load_speech_encoder(path, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and not enc.config.masked_spec_embed
    ref = load_speech_encoder(path)
    wave = torch.randn(1, 800)
    out, want = enc(wave)[-1], ref(wave)[-1]
    assert out.dtype == torch.float32
    assert _max_rel(out, want) < 0.1


def test_chunked_conv_stack_gives_the_same_frames():
    enc = tiny_speech_encoder(seed=6)
    for variant_enc in (enc, tiny_speech_encoder(seed=6, variant="large")):
        wave = torch.randn(2, 5000, generator=torch.Generator().manual_seed(9))
        whole = variant_enc.extract_features(wave, chunk_frames=None)
        for chunk in (7, 50, 249):
            parts = variant_enc.extract_features(wave, chunk_frames=chunk)
            assert parts.shape == whole.shape
            assert _max_rel(parts, whole) <= 1e-5, chunk


def test_head_count_override(tmp_path):
    path = write_tiny_wav2vec2(tmp_path / "w.safetensors")
    assert load_speech_encoder(path).config.num_heads == 2
    assert load_speech_encoder(path, num_heads=4).config.num_heads == 4
    with pytest.raises(CheckpointError, match="heads"):
        load_speech_encoder(path, num_heads=3)


def test_normalize_override_and_name_rules(tmp_path):
    path = write_tiny_wav2vec2(tmp_path / "wav2vec2-chinese-base_fp16.safetensors")
    assert not load_speech_encoder(path).expects_normalized
    assert load_speech_encoder(path, normalize=True).expects_normalized
    assert normalization_for("x/wav2vec2-base-960h.safetensors", ["encoder.layer_norm.weight"])[0]
    assert normalization_for("x/other.safetensors", ["lm_head.weight"])[0]


# ---- bad files -----------------------------------------------------------------------------------

def test_not_a_wav2vec2(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "clip.safetensors"
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="not a wav2vec2"):
        load_speech_encoder(str(path))


def test_truncated_file(tmp_path):
    path = Path(write_tiny_wav2vec2(tmp_path / "w.safetensors"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_speech_encoder(str(path))


def test_missing_and_misshapen_tensors(tmp_path):
    from safetensors.torch import save_file
    sd = tiny_wav2vec2_state_dict()
    del sd["encoder.layers.1.final_layer_norm.bias"]
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"Missing tensor\(s\): encoder.layers.1.final_layer_norm.bias"):
        load_speech_encoder(str(tmp_path / "missing.safetensors"))
    sd = tiny_wav2vec2_state_dict()
    sd["encoder.layers.0.attention.k_proj.weight"] = torch.zeros(128, 64)
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match="Wrong shape: encoder.layers.0.attention.k_proj.weight"):
        load_speech_encoder(str(tmp_path / "shape.safetensors"))


def test_half_a_weight_norm_pair(tmp_path):
    from safetensors.torch import save_file
    sd = tiny_wav2vec2_state_dict()
    del sd["encoder.pos_conv_embed.conv.weight_v"]
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="pos_conv_embed.conv.weight"):
        load_speech_encoder(str(tmp_path / "w.safetensors"))


def test_web_page_and_damaged_bin(tmp_path):
    page = tmp_path / "model.safetensors"
    page.write_bytes(b"<!DOCTYPE html><html><body>rate limited</body></html>" + b" " * 600)
    with pytest.raises(CheckpointError, match="web page"):
        load_speech_encoder(str(page))
    damaged = tmp_path / "pytorch_model.bin"
    damaged.write_bytes(b"\x80\x02not really a pickle" * 10)
    with pytest.raises(CheckpointError):
        load_speech_encoder(str(damaged))
    with pytest.raises(CheckpointError, match="no such file"):
        load_speech_encoder(str(tmp_path / "absent.safetensors"))


def test_too_short_audio_says_so():
    enc = tiny_speech_encoder()
    with pytest.raises(ValueError, match="too short"):
        enc(torch.zeros(1, 20))


# ---- the real models' key table, on the meta device ----------------------------------------------

def _real_base_shapes(weight_norm: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """chinese-wav2vec2-base / wav2vec2-base-960h, from the architecture: 7 conv layers of 512 channels
    (kernels 10,3,3,3,3,2,2, no bias, GroupNorm on the first), projection 512 -> 768, positional conv
    768 x 48 x 128 (16 groups), 12 post-LN layers of width 768, FFN 3072."""
    shapes: dict[str, tuple[int, ...]] = {}
    cin = 1
    for i, k in enumerate((10, 3, 3, 3, 3, 2, 2)):
        shapes[f"feature_extractor.conv_layers.{i}.conv.weight"] = (512, cin, k)
        cin = 512
    shapes["feature_extractor.conv_layers.0.layer_norm.weight"] = (512,)
    shapes["feature_extractor.conv_layers.0.layer_norm.bias"] = (512,)
    shapes["feature_projection.layer_norm.weight"] = shapes["feature_projection.layer_norm.bias"] = (512,)
    shapes["feature_projection.projection.weight"], shapes["feature_projection.projection.bias"] = (768, 512), (768,)
    pos = "encoder.pos_conv_embed.conv."
    g, v = (("weight_g", "weight_v") if weight_norm == "weight_g"
            else ("parametrizations.weight.original0", "parametrizations.weight.original1"))
    shapes[pos + g], shapes[pos + v], shapes[pos + "bias"] = (1, 1, 128), (768, 48, 128), (768,)
    shapes["encoder.layer_norm.weight"] = shapes["encoder.layer_norm.bias"] = (768,)
    shapes["masked_spec_embed"] = (768,)
    for n in range(12):
        b = f"encoder.layers.{n}."
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{b}attention.{p}.weight"], shapes[f"{b}attention.{p}.bias"] = (768, 768), (768,)
        for ln in ("layer_norm", "final_layer_norm"):
            shapes[f"{b}{ln}.weight"] = shapes[f"{b}{ln}.bias"] = (768,)
        shapes[f"{b}feed_forward.intermediate_dense.weight"] = (3072, 768)
        shapes[f"{b}feed_forward.intermediate_dense.bias"] = (3072,)
        shapes[f"{b}feed_forward.output_dense.weight"] = (768, 3072)
        shapes[f"{b}feed_forward.output_dense.bias"] = (768,)
    return {prefix + k: s for k, s in shapes.items()}


@pytest.mark.parametrize("weight_norm", ["weight_g", "parametrizations"])
def test_full_size_base_key_table_on_meta(weight_norm):
    sd = {k: torch.empty(s, device="meta") for k, s in _real_base_shapes(weight_norm, "wav2vec2.").items()}
    sd["lm_head.weight"], sd["lm_head.bias"] = torch.empty(32, 768, device="meta"), torch.empty(32, device="meta")
    own = {k.removeprefix("wav2vec2."): v for k, v in sd.items() if k.startswith("wav2vec2.")}
    recipe = _recipe(list(own))
    shapes = {t: tuple(src.build([own[k] for k in src.keys]).shape) for t, src in recipe.items()}
    cfg = Wav2Vec2.config_from_shapes(shapes)
    assert cfg == WAV2VEC2_BASE
    assert (cfg.hop, cfg.receptive_field, cfg.num_heads) == (320, 400, 12)
    assert cfg.num_frames(16000) == 49                        # HF: 49 frames per second of 16 kHz audio
    with torch.device("meta"):
        model = Wav2Vec2(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected == shapes
