"""MultiTalk / InfiniteTalk files: the released key table at full size (on meta), loading tiny files
from disk, fp8 storage, and the errors for the wrong model, wrong file, damaged file and bad input."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.wan.config import (
    WAN21_FLF2V_14B,
    WAN21_FUN_INP_1_3B,
    WAN21_I2V_14B_480P,
    WAN21_T2V_1_3B,
    WAN21_T2V_14B,
    WAN22_I2V_A14B,
    tiny,
)
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.errors import WanInputError
from slipstream.models.wan.multitalk import MultiTalkAdapter, is_multitalk_file, multitalk_keys
from slipstream.models.wan.multitalk_conditioning import (
    MultiTalkConditioning,
    regions_from_bboxes,
    regions_from_masks,
    token_regions,
)

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from bad_input_cases import BadInput, assert_bad_input, cases_param  # noqa: E402
from multitalk_fixtures import tiny_features, tiny_multitalk_state_dict, write_tiny_multitalk  # noqa: E402

CFG = tiny("i2v", text_dim=64, clip_dim=96)


def official_key_table() -> dict[str, tuple[int, ...]]:
    """The released files' tensors, written out from the official module definitions: AudioProjModel
    (seq_len 5, seq_len_vf 8, 12 blocks of 768, intermediate 512, 32 tokens of 768, LayerNorm) and per
    block SingleStreamMutiAttention (q_linear, kv_linear 768 -> 2·5120, proj; no q/k norms) and norm_x."""
    table = {"audio_proj.proj1.weight": (512, 5 * 12 * 768), "audio_proj.proj1.bias": (512,),
             "audio_proj.proj1_vf.weight": (512, 8 * 12 * 768), "audio_proj.proj1_vf.bias": (512,),
             "audio_proj.proj2.weight": (512, 512), "audio_proj.proj2.bias": (512,),
             "audio_proj.proj3.weight": (32 * 768, 512), "audio_proj.proj3.bias": (32 * 768,),
             "audio_proj.norm.weight": (768,), "audio_proj.norm.bias": (768,)}
    for n in range(40):
        b = f"blocks.{n}."
        table |= {b + "audio_cross_attn.q_linear.weight": (5120, 5120), b + "audio_cross_attn.q_linear.bias": (5120,),
                  b + "audio_cross_attn.kv_linear.weight": (10240, 768),
                  b + "audio_cross_attn.kv_linear.bias": (10240,),
                  b + "audio_cross_attn.proj.weight": (5120, 5120), b + "audio_cross_attn.proj.bias": (5120,),
                  b + "norm_x.weight": (5120,), b + "norm_x.bias": (5120,)}
    return table


def meta_file(table=None, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(s, device="meta", dtype=torch.bfloat16)
            for k, s in (table or official_key_table()).items()}


def test_released_key_table_at_full_size_attaches_to_the_i2v_14b_on_meta():
    table = official_key_table()
    assert len(table) == 330 and multitalk_keys() == table
    dit = WanDiT.build_meta(WAN21_I2V_14B_480P)
    for prefix in ("", "model.diffusion_model."):
        assert is_multitalk_file(meta_file(prefix=prefix))
    adapter = MultiTalkAdapter.from_state_dict(meta_file(), dit, dtype=torch.bfloat16,
                                               what="infinitetalk_single.safetensors")
    assert adapter.variant == "infinitetalk-single"
    dit.attach_audio(adapter)
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    for key, shape in table.items():
        assert shapes[("audio_adapter." if key.startswith("audio_proj.") else "") + key] == shape
    quantizable = set(dit.quantizable_keys())
    assert "blocks.39.audio_cross_attn.kv_linear.weight" in quantizable        # int8 / fp8 see them
    assert not any("norm_x" in k or "audio_proj" in k for k in quantizable)


def test_a_whole_dit_file_uses_only_its_speech_weights_with_a_note(caplog):
    dit = WanDiT.build_meta(WAN21_I2V_14B_480P)
    whole = {**meta_file(multitalk_keys() | WanDiT.expected_shapes(WAN21_I2V_14B_480P))}
    with caplog.at_level(logging.INFO, logger="slipstream.wan"):
        MultiTalkAdapter.from_state_dict(whole, dit, what="multitalk_full.safetensors")
    assert "whole Wan DiT" in caplog.text


@pytest.mark.parametrize("config,words", [
    (WAN21_T2V_14B, "text-to-video"), (WAN21_T2V_1_3B, "text-to-video"), (WAN21_FLF2V_14B, "first/last-frame"),
    (WAN22_I2V_A14B, "Wan 2.2"), (WAN21_FUN_INP_1_3B, "1536 wide with 30 blocks")])
def test_wrong_base_model_is_named_with_what_to_load(config, words):
    dit = WanDiT.build_meta(config)
    with pytest.raises(CheckpointError, match=words) as err:
        MultiTalkAdapter.from_state_dict(meta_file(), dit)
    assert "Wan2.1-I2V-14B" in str(err.value)


def test_other_files_are_named():
    dit = WanDiT.build_meta(WAN21_I2V_14B_480P)
    fantasy = {"proj_model.proj.weight": torch.zeros(1), "blocks.0.cross_attn.k_proj.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="FantasyTalking"):
        MultiTalkAdapter.from_state_dict(fantasy, dit)
    assert not is_multitalk_file(fantasy) and not is_multitalk_file(WanDiT.expected_shapes(WAN21_I2V_14B_480P))


@pytest.fixture
def tiny_dit():
    return WanDiT.from_state_dict(random_state_dict(CFG, seed=2))


def test_tiny_file_from_disk_equals_the_state_dict(tmp_path, tiny_dit):
    sd = write_tiny_multitalk(tmp_path / "multitalk.safetensors", CFG, seed=4)
    a = MultiTalkAdapter.from_file(str(tmp_path / "multitalk.safetensors"), tiny_dit)
    b = MultiTalkAdapter.from_state_dict(sd, WanDiT.from_state_dict(random_state_dict(CFG, seed=2)))
    torch.testing.assert_close(a.audio_proj.proj1_vf.weight, b.audio_proj.proj1_vf.weight)
    tiny_dit.attach_audio(a)
    torch.testing.assert_close(tiny_dit.blocks[1].audio_cross_attn.kv_linear.weight,
                               sd["blocks.1.audio_cross_attn.kv_linear.weight"])
    with pytest.raises(ValueError, match="already"):
        a.attach(tiny_dit)


def test_fp8_model_stores_the_block_linears_in_fp8(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no fp8")
    dit = WanDiT.from_state_dict(random_state_dict(CFG, seed=2), weight_dtype=torch.float8_e4m3fn)
    adapter = MultiTalkAdapter.from_state_dict(tiny_multitalk_state_dict(CFG, seed=4), dit)
    dit.attach_audio(adapter)
    lin = dit.blocks[0].audio_cross_attn.q_linear
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale is not None
    assert dit.blocks[0].norm_x.weight.dtype == torch.float32 and adapter.audio_proj.proj1.weight.dtype == torch.float32
    f, h, w = 3, 8, 12
    out = dit(torch.randn(1, 16, f, h, w), torch.tensor([500.0]), torch.randn(1, 5, 64), torch.randn(1, 257, 96),
              torch.randn(1, 20, f, h, w), audio=tiny_features(9, speakers=2, image_hw=(64, 96)))
    assert torch.isfinite(out).all()


def test_damaged_and_mismatched_files_are_refused(tmp_path, tiny_dit):
    sd = tiny_multitalk_state_dict(CFG)
    path = tmp_path / "cut.safetensors"
    save_file(sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated|cut short|damaged|too short"):
        MultiTalkAdapter.from_file(str(path), tiny_dit)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.norm_x.bias"}
    with pytest.raises(CheckpointError, match="blocks.1.norm_x.bias"):
        MultiTalkAdapter.from_state_dict(missing, tiny_dit)
    wrong = {**sd, "blocks.1.audio_cross_attn.kv_linear.weight": torch.zeros(512, 8)}
    with pytest.raises(CheckpointError, match="Wrong shape"):
        MultiTalkAdapter.from_state_dict(wrong, tiny_dit)
    integer = {**sd, "blocks.0.norm_x.weight": torch.zeros(256, dtype=torch.int32)}
    with pytest.raises(CheckpointError, match="int32"):
        MultiTalkAdapter.from_state_dict(integer, tiny_dit)
    deeper = tiny_multitalk_state_dict(replace(CFG, num_layers=3))
    with pytest.raises(CheckpointError, match="3 blocks"):
        MultiTalkAdapter.from_state_dict(deeper, tiny_dit)


def test_bad_conditioning_is_explained(tiny_dit):
    tiny_dit.attach_audio(MultiTalkAdapter.from_state_dict(tiny_multitalk_state_dict(CFG), tiny_dit))
    x, t, ctx, clip, y = (torch.randn(1, 16, 3, 8, 12), torch.tensor([500.0]), torch.randn(1, 5, 64),
                          torch.randn(1, 257, 96), torch.randn(1, 20, 3, 8, 12))
    with pytest.raises(ValueError, match="num_frames of the MultiTalk embeds node to 9"):
        tiny_dit(x, t, ctx, clip, y, audio=tiny_features(13))
    with pytest.raises(ValueError, match="values per frame"):
        tiny_dit(x, t, ctx, clip, y, audio=tiny_features(9, channels=8))
    with pytest.raises(ValueError, match="two speakers need their places"):
        MultiTalkConditioning(torch.zeros(2, 9, 5, 2, 16))
    with pytest.raises(ValueError, match="one or two speakers"):
        MultiTalkConditioning(torch.zeros(3, 9, 5, 2, 16), torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="windows of 5"):
        MultiTalkConditioning(torch.zeros(1, 9, 2, 16))


def test_speaker_placement_errors():
    with pytest.raises(ValueError, match="speaker 2 is empty"):
        regions_from_masks(torch.ones(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="x_min, y_min, x_max, y_max"):
        regions_from_bboxes("1,2,3", "0,0,4,4", 8, 8)
    with pytest.raises(ValueError, match="covers nothing"):
        regions_from_bboxes("5,0,2,4", "0,0,4,4", 8, 8)
    regions = regions_from_bboxes("0, 0, 4, 8", "4,0,8,8", 8, 8)      # x from the left: columns
    assert regions[0, :, :4].all() and not regions[0, :, 4:].any() and not regions[2].any()
    tiny_region = torch.zeros(3, 64, 96)
    tiny_region[0, 3, 3] = 1                       # between the pixels nearest scaling samples
    tiny_region[1, 30:, 30:] = 1
    with pytest.raises(ValueError, match="speaker 1's mask covers no latent patch"):
        token_regions(tiny_region, (8, 12), (4, 6))


def test_int8_conversion_takes_the_block_linears_and_keeps_the_projector_float():
    from slipstream.kernels.quant_layer import QuantPlan, convert_linears
    from slipstream.models.quant_presets import BY_NAME

    dit = WanDiT.from_state_dict(random_state_dict(CFG, seed=2))
    dit.attach_audio(MultiTalkAdapter.from_state_dict(tiny_multitalk_state_dict(CFG), dit))
    convert_linears(dit, QuantPlan(on_the_fly=True, exclude=BY_NAME["wan"].rules()))
    assert type(dit.blocks[1].audio_cross_attn.kv_linear).__name__ != "CastLinear"
    assert type(dit.audio_adapter.audio_proj.proj1).__name__ == "CastLinear"
    f, h, w = 3, 8, 12
    out = dit(torch.randn(1, 16, f, h, w), torch.tensor([500.0]), torch.randn(1, 5, 64), torch.randn(1, 257, 96),
              torch.randn(1, 20, f, h, w), audio=tiny_features(9, speakers=2, image_hw=(64, 96)))
    assert torch.isfinite(out).all()


def _speech_node(**kw):
    from slipstream.nodes.wan_multitalk import WanMultiTalkEmbeds
    args = dict(num_frames=9, frame_rate=25.0, audio_scale=1.0, normalize_loudness=False, multi_audio_type="para",
                placement="masks")
    args.update(kw)
    voice = {"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}
    return WanMultiTalkEmbeds().encode(None, voice, **args)


def _truncated(tmp_path):
    path = tmp_path / "multitalk.safetensors"
    write_tiny_multitalk(path, CFG)
    path.write_bytes(path.read_bytes()[:-64])
    return MultiTalkAdapter.from_file(str(path), WanDiT.from_state_dict(random_state_dict(CFG, seed=2)))


BAD_INPUTS = [
    BadInput("on-t2v-14b", lambda _: MultiTalkAdapter.from_state_dict(meta_file(), WanDiT.build_meta(WAN21_T2V_14B)),
             CheckpointError, ("Wan2.1-T2V-14B", "Wan2.1-I2V-14B")),
    BadInput("on-1.3b", lambda _: MultiTalkAdapter.from_state_dict(meta_file(), WanDiT.build_meta(WAN21_T2V_1_3B)),
             CheckpointError, ("1.3B", "Wan2.1-I2V-14B")),
    BadInput("truncated-file", _truncated, CheckpointError, ("multitalk.safetensors",)),
    BadInput("two-speakers-no-masks", lambda _: _speech_node(audio_2={"waveform": torch.zeros(1, 1, 800),
                                                                       "sample_rate": 16000}),
             WanInputError, ("mask_1", "mask_2", "left / right")),
    BadInput("frames-not-4k+1", lambda _: _speech_node(num_frames=10), WanInputError, ("num_frames", "4k + 1")),
    BadInput("bad-bbox", lambda _: _speech_node(audio_2={"waveform": torch.zeros(1, 1, 800), "sample_rate": 16000},
                                                placement="bounding boxes", bbox_1="1,2", bbox_2="0,0,4,4",
                                                start_image=torch.zeros(1, 8, 8, 3)),
             WanInputError, ("bbox", "x_min, y_min, x_max, y_max")),
]


@cases_param(BAD_INPUTS)
def test_bad_input(case, tmp_path, monkeypatch):
    from slipstream.models.wan import multitalk_speech as speech

    def frames(encoder, wave, num_frames, fps, progress=None):
        return torch.zeros(num_frames, 2, 16)
    api = type("Api", (), {"prepare_waveform": staticmethod(lambda a, **kw: a["waveform"][0].mean(0)),
                           "multitalk_features": staticmethod(frames)})
    monkeypatch.setattr(speech, "_audio_api", lambda: api)
    assert_bad_input(case, tmp_path)
