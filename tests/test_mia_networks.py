"""The five MIA networks match the published checkpoints key for key, and their files convert safely."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from mia_fixtures import SHAPES_FILE, TINY, parse_shapes
from slipstream.models.mia import networks, skeleton, weights
from slipstream.models.mia.networks import NETWORK_NAMES, build_network

PARAMS = {"joints_coarse": 106_145_799, "bw": 106_142_773, "bw_normal": 107_220_533, "joints": 131_417_607,
          "pose": 131_421_191}


@pytest.fixture(scope="module")
def spec_shapes():
    return parse_shapes(SHAPES_FILE)


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_full_size_keys_and_shapes_match_spec(name, spec_shapes):
    model = build_network(name, device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == spec_shapes[name]
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_skeleton_tree_facts():
    assert [sum(m) for m in skeleton.level_masks()] == [1, 3, 3, 3, 5, 3, 2, 2, 10, 10, 10]
    assert sum(map(sum, skeleton.attention_mask())) == 401
    assert sum(map(sum, skeleton.parent_mask())) == 51
    assert len(skeleton.NO_FINGERS_INDICES) == 22
    assert skeleton.NO_FINGERS_INDICES == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 25, 26, 27, 28, 44, 45, 46, 47, 48, 49, 50, 51)
    for j in skeleton.JOINTS:  # parents come first: the tree heads and pose propagation rely on it
        assert j.parent < j.index


def test_flash_only_where_the_spec_allows():
    model = build_network("bw_normal", device="meta")
    flash = {n for n, m in model.named_modules() if isinstance(m, networks.Attention) and m.flash_ok}
    assert flash == {f"base.layers.{i}.0.fn" for i in range(24)} | {"input_attn.attn"}


def test_point_embedding_runs_in_fp32_under_bf16():
    net = build_network("bw", TINY).to(torch.bfloat16)
    net.base.point_embed.basis.data = networks.fourier_basis(48)  # as load_network keeps it
    xyz = torch.rand(1, 5, 3) * 2 - 1
    feats = networks.fourier_features(xyz.to(torch.bfloat16), net.base.point_embed.basis)
    assert feats.dtype == torch.float32
    exact = networks.fourier_features(xyz.to(torch.bfloat16).float(), networks.fourier_basis(48))
    assert torch.equal(feats, exact)


def test_ortho6d_gives_rotations():
    m = networks.ortho6d_to_matrix(torch.randn(100, 6, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand(100, 3, 3)
    assert torch.allclose(m.transpose(-1, -2) @ m, eye, atol=1e-10)
    assert torch.allclose(torch.linalg.det(m), torch.ones(100, dtype=torch.float64))
    assert torch.allclose(networks.ortho6d_to_matrix(networks.matrix_to_ortho6d(m)), m, atol=1e-10)


def test_tiny_networks_produce_the_right_outputs():
    torch.manual_seed(0)
    pc = torch.rand(1, TINY.num_points, 6) * 2 - 1
    bw = build_network("bw_normal", TINY)(pc, queries=pc[:, :7])
    assert bw.shape == (1, 7, 52) and torch.allclose(bw.sum(-1), torch.ones(1, 7), atol=1e-5)
    joints = build_network("joints", TINY)(pc[..., :3])
    assert joints.shape == (1, 52, 6)
    pose = build_network("pose", TINY)(pc[..., :3], joints=joints)
    assert pose.shape == (1, 52, 6) and torch.isfinite(pose).all()


@pytest.mark.parametrize("name", ["joints_coarse", "pose"])
def test_pth_in_published_layout_converts_and_reloads_identically(tmp_path, name):
    torch.manual_seed(1)
    state = build_network(name, TINY).state_dict()
    published = dict(state)
    published["joints_head.mask_attn" if name != "pose" else "pose_head.mask_attn"] = torch.ones(52, 52, dtype=torch.bool)
    if name == "pose":
        published["joints_embedder.embed.basis"] = torch.zeros(3, 24)  # deprecated keys are dropped
    pth, st = tmp_path / f"{name}.pth", tmp_path / f"{name}.safetensors"
    torch.save({"model": published}, pth)
    weights.convert_pth(str(pth), str(st), name, TINY)
    model = weights.load_network(str(st), name)
    reloaded = model.state_dict()
    assert set(reloaded) == set(state)
    for k, v in state.items():
        assert torch.equal(reloaded[k], v), k
    assert model.pose_head.mask_attn.sum() == 401 if name == "pose" else True


def test_bad_checkpoints_get_clear_errors(tmp_path):
    sd = build_network("bw", TINY).state_dict()
    sd["bw_head.weight"] = torch.zeros(10, 64)
    bad = tmp_path / "bw.pth"
    torch.save({"model": sd}, bad)
    with pytest.raises(weights.CheckpointError, match=r"Wrong shape: bw_head\.weight \(10, 64\)"):
        weights.convert_pth(str(bad), str(tmp_path / "bw.safetensors"), "bw", TINY)
    good = tmp_path / "good.pth"
    torch.save({"model": build_network("bw", TINY).state_dict()}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(weights.CheckpointError, match="truncated"):
        weights.convert_pth(str(cut), str(tmp_path / "x.safetensors"), "bw", TINY)
    assert not (tmp_path / "x.safetensors").exists()
    weights.convert_pth(str(good), str(tmp_path / "bw.safetensors"), "bw", TINY)
    with pytest.raises(weights.CheckpointError, match="holds the MIA 'bw' network"):
        weights.load_network(str(tmp_path / "bw.safetensors"), "pose")
    st = tmp_path / "bw.safetensors"
    st.write_bytes(st.read_bytes()[:3000])
    with pytest.raises(weights.CheckpointError, match="truncated — its header needs"):
        weights.load_network(str(st), "bw")
