"""FantasyTalking files: the real fantasytalking_model.ckpt's key names and shapes at full size on `meta`,
both file layouts, which Wan models are refused and how, and damaged or wrong files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from fantasytalking_fixtures import nested, random_fantasytalking, write_tiny_fantasytalking
from slipstream.models.checkpoint import CheckpointError, load_state_dict
from slipstream.models.wan import config as wc
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.fantasytalking import (
    FantasyTalkingAdapter,
    FantasyTalkingConditioning,
    is_fantasytalking_file,
)

CFG = wc.tiny("i2v", text_dim=64, clip_dim=96)


def real_file_on_meta(layers: int = 40, dim: int = 5120) -> dict[str, torch.Tensor]:
    """Every tensor of the released fantasytalking_model.ckpt (flat names), on meta: the 768 -> 2048
    projector and, per block of Wan2.1-I2V-14B, the audio key/value projections 2048 -> 5120."""
    sd = {"proj_model.proj.weight": torch.empty(2048, 768, device="meta"),
          "proj_model.norm.weight": torch.empty(2048, device="meta"),
          "proj_model.norm.bias": torch.empty(2048, device="meta")}
    for i in range(layers):
        sd[f"audio_processor.blocks.{i}.cross_attn.processor.k_proj.weight"] = torch.empty(dim, 2048, device="meta")
        sd[f"audio_processor.blocks.{i}.cross_attn.processor.v_proj.weight"] = torch.empty(dim, 2048, device="meta")
    return sd


@pytest.fixture(scope="module")
def tiny_dit():
    return WanDiT.from_state_dict(random_state_dict(CFG, seed=3))


def fresh(sd=None) -> WanDiT:
    return WanDiT.from_state_dict(sd or random_state_dict(CFG, seed=3))


# ------------------------------------------------------------------------------------ the real file
@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_the_real_file_fits_wan21_i2v_14b_720p_on_meta(layout):
    dit = WanDiT.build_meta(wc.WAN21_I2V_14B_720P)
    sd = real_file_on_meta()
    assert len(sd) == 3 + 40 * 2 and is_fantasytalking_file(sd) and is_fantasytalking_file(nested(sd))
    adapter = FantasyTalkingAdapter.from_state_dict(nested(sd) if layout == "nested" else sd, dit,
                                                    dtype=torch.bfloat16)
    dit.attach_audio(adapter)
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    for key, value in sd.items():
        if key.startswith("audio_processor."):
            assert shapes[key.removeprefix("audio_processor.")] == tuple(value.shape)
        else:
            assert shapes["audio_adapter." + key] == tuple(value.shape)
    assert dit.blocks[39].cross_attn.processor.k_proj.weight.dtype == torch.bfloat16
    assert dit.audio_adapter.proj_model.proj.weight.dtype == torch.float32        # the projector stays fp32
    assert sum(".processor." in k for k in dit.quantizable_keys()) == 80


def test_both_layouts_load_from_disk_to_the_same_weights(tmp_path, tiny_dit):
    ckpt = write_tiny_fantasytalking(tmp_path / "fantasytalking_model.ckpt", CFG, seed=7)
    sft = write_tiny_fantasytalking(tmp_path / "fantasytalking_model.safetensors", CFG, seed=7)
    assert is_fantasytalking_file(load_state_dict(ckpt)) and is_fantasytalking_file(load_state_dict(sft))
    a, b = (FantasyTalkingAdapter.from_file(p, fresh()) for p in (ckpt, sft))
    assert torch.equal(a.proj_model.norm.bias, b.proj_model.norm.bias)
    assert all(torch.equal(p.k_proj.weight, q.k_proj.weight) for p, q in zip(a._processors, b._processors, strict=True))
    flat = random_fantasytalking(CFG, seed=7)
    assert torch.equal(a._processors[1].v_proj.weight, flat["audio_processor.blocks.1.cross_attn.processor.v_proj.weight"])


# ------------------------------------------------------------------------------------ which Wan
@pytest.mark.parametrize("config,words", [
    (wc.WAN21_T2V_14B, "text-to-video"),
    (wc.WAN21_T2V_1_3B, "text-to-video"),
    (wc.WAN21_FUN_INP_1_3B, "1.3B"),
    (wc.WAN22_I2V_A14B, "Wan 2.2"),
    (wc.WAN22_TI2V_5B, "Wan 2.2"),
    (wc.WAN21_FLF2V_14B, "first/last-frame"),
    (wc.WAN21_VACE_14B, "VACE"),
    (wc.WAN21_FUN_CONTROL_14B, "48 input channels"),
])
def test_models_it_was_not_trained_on_are_refused_with_what_to_load(config, words):
    dit = WanDiT.build_meta(config)
    with pytest.raises(CheckpointError) as err:
        FantasyTalkingAdapter.from_state_dict(real_file_on_meta(config.num_layers, config.dim), dit)
    assert words in str(err.value) and "Wan2.1-I2V-14B-720P" in str(err.value)


def test_the_480p_model_has_the_same_architecture_and_loads():
    dit = WanDiT.build_meta(wc.WAN21_I2V_14B_480P)
    dit.attach_audio(FantasyTalkingAdapter.from_state_dict(real_file_on_meta(), dit))


def test_a_tiny_t2v_model_is_refused(tiny_dit):
    t2v = wc.tiny("t2v", text_dim=64)
    with pytest.raises(CheckpointError, match="text-to-video"):
        FantasyTalkingAdapter.from_state_dict(random_fantasytalking(t2v), WanDiT.build_meta(t2v))


def test_a_file_for_another_size_names_the_mismatch(tiny_dit):
    other = wc.tiny("i2v", text_dim=64, clip_dim=96, num_layers=3)
    with pytest.raises(CheckpointError, match=r"Unexpected tensor\(s\): audio_processor.blocks.2"):
        FantasyTalkingAdapter.from_state_dict(random_fantasytalking(other), tiny_dit)
    sd = random_fantasytalking(CFG)
    del sd["audio_processor.blocks.1.cross_attn.processor.v_proj.weight"]
    with pytest.raises(CheckpointError, match=r"Missing tensor\(s\): audio_processor.blocks.1.cross_attn.processor.v_proj"):
        FantasyTalkingAdapter.from_state_dict(sd, tiny_dit)


# ------------------------------------------------------------------------------------ wrong files
def test_a_multitalk_file_given_as_fantasytalking_says_so(tiny_dit):
    multitalk = {"audio_proj.proj1.weight": torch.zeros(4, 4), "audio_proj.norm.weight": torch.zeros(4),
                 "blocks.0.audio_cross_attn.q_linear.weight": torch.zeros(4, 4)}
    assert not is_fantasytalking_file(multitalk)
    with pytest.raises(CheckpointError, match="MultiTalk / InfiniteTalk model, not FantasyTalking"):
        FantasyTalkingAdapter.from_state_dict(multitalk, tiny_dit)


def test_a_wan_dit_or_unrelated_file_is_not_fantasytalking(tiny_dit):
    dit_sd = random_state_dict(CFG, seed=3)
    assert not is_fantasytalking_file(dit_sd)
    with pytest.raises(CheckpointError, match="Wan diffusion model, not a FantasyTalking file"):
        FantasyTalkingAdapter.from_state_dict(dit_sd, tiny_dit)
    with pytest.raises(CheckpointError, match="not a FantasyTalking file"):
        FantasyTalkingAdapter.from_state_dict({"encoder.weight": torch.zeros(2)}, tiny_dit)


@pytest.mark.parametrize("name", ["ft.ckpt", "ft.safetensors"])
def test_a_truncated_file_is_reported_as_damaged(tmp_path, name):
    path = write_tiny_fantasytalking(tmp_path / name, CFG)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged|truncated"):
        FantasyTalkingAdapter.from_file(path, fresh())


def test_non_float_or_non_finite_tensors_are_refused(tmp_path, tiny_dit):
    sd = random_fantasytalking(CFG)
    sd["proj_model.norm.bias"] = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(CheckpointError, match="not floating point"):
        FantasyTalkingAdapter.from_state_dict(sd, tiny_dit)
    sd = random_fantasytalking(CFG)
    sd["proj_model.norm.bias"][3] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="proj_model.norm.bias' holds NaN"):
        FantasyTalkingAdapter.from_file(str(tmp_path / "nan.safetensors"), fresh())


# ------------------------------------------------------------------------------------ attaching, features
def test_attach_once_and_run_only_when_attached():
    dit = fresh()
    adapter = FantasyTalkingAdapter.from_state_dict(random_fantasytalking(CFG), dit)
    cond = FantasyTalkingConditioning(torch.randn(1, 20, 768), num_frames=9)
    with pytest.raises(RuntimeError, match="attach"):
        adapter.prepare(cond, batch=1, grid=(3, 2, 3), device=torch.device("cpu"), dtype=torch.float32)
    dit.attach_audio(adapter)
    with pytest.raises(ValueError, match="already carries"):
        dit.attach_audio(FantasyTalkingAdapter.from_state_dict(random_fantasytalking(CFG), dit))
    other = fresh()
    with pytest.raises(ValueError, match="already attached"):
        adapter.attach(other)


def test_bad_audio_features_get_clear_errors():
    dit = fresh()
    dit.attach_audio(FantasyTalkingAdapter.from_state_dict(random_fantasytalking(CFG), dit))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 3, 4, 6, generator=g), torch.randn(1, 20, 3, 4, 6, generator=g)
    ctx, clip = torch.randn(1, 8, 64, generator=g), torch.randn(1, 257, 96, generator=g)
    t = torch.tensor([500.0])
    with pytest.raises(ValueError, match="1024 wide, but this model takes 768"):
        dit(x, t, ctx, clip, y, audio=FantasyTalkingConditioning(torch.randn(1, 20, 1024), num_frames=9))
    with pytest.raises(ValueError, match="13 video frames = 4 latent frames, but the latent has 3"):
        dit(x, t, ctx, clip, y, audio=FantasyTalkingConditioning(torch.randn(1, 20, 768), num_frames=13))
    with pytest.raises(ValueError, match=r"\[1, L, 768\]"):
        FantasyTalkingConditioning(torch.randn(20, 768), num_frames=9)
    with pytest.raises(ValueError, match="finite"):
        FantasyTalkingConditioning(torch.full((1, 4, 768), float("nan")), num_frames=9)
    with pytest.raises(ValueError, match="audio_scale"):
        FantasyTalkingConditioning(torch.randn(1, 4, 768), num_frames=9, audio_scale=float("inf"))
    with pytest.raises(ValueError, match="start >= 0"):
        FantasyTalkingConditioning(torch.randn(1, 4, 768), num_frames=9).frames(-1, 5)
    plain = fresh()
    with pytest.raises(ValueError, match="no speech model attached"):
        plain(x, t, ctx, clip, y, audio=FantasyTalkingConditioning(torch.randn(1, 20, 768), num_frames=9))


def test_each_processor_goes_where_its_block_is():
    dit = fresh()
    dit.blocks[1].to("meta")                 # a block kept elsewhere (block swap keeps some in RAM)
    dit.attach_audio(FantasyTalkingAdapter.from_state_dict(random_fantasytalking(CFG), dit))
    assert dit.blocks[0].cross_attn.processor.v_proj.weight.device.type == "cpu"
    assert dit.blocks[1].cross_attn.processor.v_proj.weight.device.type == "meta"
    assert dit.audio_adapter.proj_model.proj.weight.device.type == "cpu"
