"""The MIA pipeline with miniature random-weight networks: rig completes, GLB is structurally right."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from mia_fixtures import tiny_networks  # noqa: E402
from slipstream.models.mia import gltf, skeleton  # noqa: E402
from slipstream.models.mia.humanoid import make_humanoid  # noqa: E402
from slipstream.models.mia.rig import (  # noqa: E402
    MIANetworks,
    apply,
    clean_weights,
    hips_transform,
    pose_to_global,
    rig_mesh,
)

# Put the figure somewhere else and at another size: the rig must come back in this frame.
SCALE, OFFSET = 37.0, (5.0, -3.0, 12.0)


@pytest.fixture(scope="module")
def nets():
    n = tiny_networks()
    return MIANetworks(n["joints_coarse"], n["bw"], n["bw_normal"], n["joints"], n["pose"], torch.float32,
                       torch.device("cpu"), "sdpa")


@pytest.fixture(scope="module")
def humanoid():
    return make_humanoid(scale=SCALE, offset=OFFSET)


@pytest.fixture(scope="module")
def rigs(nets, humanoid):
    """Two rigs shared by the tests: 22 joints in the input pose, and 52 joints reset to rest with normals."""
    kept = rig_mesh(nets, humanoid, no_fingers=True, use_normal=False, reset_to_rest=False)
    rest = rig_mesh(nets, humanoid, no_fingers=False, use_normal=True, reset_to_rest=True)
    return {"kept": kept, "rest": rest}


def _glb(mesh, rig):
    return gltf.read_glb(gltf.rigged_glb_bytes(mesh, rig))


def _world(doc, index, parent_of):
    node = doc["nodes"][index]
    m = np.eye(4)
    x, y, z, w = node["rotation"]
    m[:3, :3] = [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                 [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                 [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]
    m[:3, 3] = node["translation"]
    parent = parent_of.get(index)
    return m if parent is None else _world(doc, parent, parent_of) @ m


@pytest.mark.parametrize("which, count", [("kept", 22), ("rest", 52)])
def test_glb_structure(rigs, humanoid, which, count):
    rig = rigs[which]
    doc, binary = _glb(humanoid, rig)
    skin = doc["skins"][0]
    joint_nodes = skin["joints"]
    names = [doc["nodes"][i]["name"] for i in joint_nodes]
    assert len(joint_nodes) == count and all(n.startswith("mixamorig:") for n in names)
    # hierarchy = the Mixamo skeleton's parents
    parent_of = {c: i for i, n in enumerate(doc["nodes"]) for c in n.get("children", [])}
    for node, name in zip(joint_nodes, names, strict=True):
        j = skeleton.INDEX[name]
        parent = parent_of.get(node)
        expected = skeleton.PARENTS[j]
        assert (parent is None) == (expected < 0)
        if parent is not None:
            assert doc["nodes"][parent]["name"] == skeleton.NAMES[expected]
    # inverse bind matrices invert the joint world matrices
    ibm = gltf.accessor_array(doc, binary, skin["inverseBindMatrices"]).reshape(-1, 4, 4).transpose(0, 2, 1)
    for k, node in enumerate(joint_nodes):
        world = _world(doc, node, parent_of)
        assert np.allclose(ibm[k] @ world, np.eye(4), atol=1e-4)
        assert np.allclose(world[:3, :3].T @ world[:3, :3], np.eye(3), atol=1e-5)  # rigid: no scale
    # weights: <= 4 influences, non-negative, summing to 1
    prim = doc["meshes"][0]["primitives"][0]
    w = gltf.accessor_array(doc, binary, prim["attributes"]["WEIGHTS_0"])
    j = gltf.accessor_array(doc, binary, prim["attributes"]["JOINTS_0"])
    assert w.shape == (len(humanoid.vertices), 4) and (w >= 0).all()
    assert np.allclose(w.sum(axis=1), 1.0, atol=1e-5)
    assert j.max() < count
    assert np.count_nonzero(rig.weights, axis=1).max() <= 4
    # the mesh node is at the root, untransformed, skinned; texture and material carried over
    mesh_node = next(n for n in doc["nodes"] if "mesh" in n)
    assert mesh_node["skin"] == 0 and not {"matrix", "translation", "rotation", "scale"} & set(mesh_node)
    assert doc["images"] and doc["textures"] and "baseColorTexture" in doc["materials"][0]["pbrMetallicRoughness"]
    assert "TEXCOORD_0" in prim["attributes"]


def test_positions_equal_the_input_without_reset(rigs, humanoid):
    doc, binary = _glb(humanoid, rigs["kept"])
    pos = gltf.accessor_array(doc, binary, doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"])
    assert np.array_equal(pos, np.asarray(humanoid.vertices, dtype=np.float32))
    loaded = trimesh.load(trimesh.util.wrap_as_stream(gltf.rigged_glb_bytes(humanoid, rigs["kept"])),
                          file_type="glb", process=False, force="mesh")
    assert len(loaded.vertices) == len(humanoid.vertices)


def test_rig_is_in_the_input_frame(rigs, humanoid):
    rig = rigs["kept"]
    lo, hi = humanoid.bounds
    size = np.ptp(humanoid.vertices, axis=0).max()
    # joints from random weights sit near the normalised cloud, i.e. around the figure, at its scale
    centre = rig.heads.mean(axis=0)
    assert np.all(np.abs(centre - (lo + hi) / 2) < 2 * size)
    assert 0.01 * size < np.ptp(rig.heads, axis=0).max() < 10 * size


def test_reset_to_rest_follows_linear_blend_skinning(rigs, humanoid):
    rest = rigs["rest"]
    assert rest.vertices.shape == humanoid.vertices.shape and np.isfinite(rest.vertices).all()
    assert not np.allclose(rest.vertices, humanoid.vertices)  # random pose rotations move the mesh


def test_identity_pose_leaves_everything_in_place():
    heads = np.random.default_rng(0).normal(size=(52, 3))
    mats = pose_to_global(np.tile(np.eye(3), (52, 1, 1)), heads)
    assert np.allclose(mats, np.eye(4))


def test_canonical_frame_puts_hips_at_origin_and_legs_down():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    hips, right, left = np.array([0, 1.0, 0]), np.array([-0.1, 0.9, 0]), np.array([0.1, 0.9, 0])
    foot = np.array([0.1, 0.0, 0])
    world = lambda p: q @ p + np.array([3.0, -2.0, 1.0])  # noqa: E731
    m = hips_transform(world(hips), world(right), world(left))
    assert np.allclose(apply(m, world(hips)), 0, atol=1e-9)
    assert np.allclose(apply(m, world(left)) - apply(m, world(right)), [0.2, 0, 0], atol=1e-9)
    assert apply(m, world(foot))[1] < -0.9


def _table(rows):
    bw = torch.full((len(rows), 52), 1e-3)
    for v, row in enumerate(rows):
        for name, w in row.items():
            bw[v, skeleton.index_of(name)] = w
    return bw / bw.sum(-1, keepdim=True)


def test_weight_cleanup_matches_upstream_examples():
    bw = _table([{"LeftHandIndex2": 0.8, "LeftHand": 0.2}, {"LeftHand": 0.7, "LeftHandIndex2": 0.3},
                 {"LeftForeArm": 0.6, "Spine2": 0.3, "RightForeArm": 0.1}, {"RightHand": 0.6, "LeftHand": 0.4}])
    out = clean_weights(bw, torch.zeros(4, dtype=torch.bool), no_fingers=True)
    i = skeleton.index_of
    assert out[0, i("LeftHand")] > 0.99
    assert out[1, i("LeftHand")] > 0.99
    assert out[2, i("LeftForeArm")] > 0.98 and out[2, i("Spine2")] == 0 and out[2, i("RightForeArm")] == 0
    assert out[3, i("RightHand")] > 0.98 and out[3, i("LeftHand")] == 0
    assert ((out > 0).sum(-1) <= 4).all()
    kept = clean_weights(bw, torch.zeros(4, dtype=torch.bool), no_fingers=False)
    assert abs(kept[0, i("LeftHandIndex2")] - 0.8) < 0.02 and abs(kept[0, i("LeftHand")] - 0.2) < 0.02
    head = clean_weights(bw[:1], torch.ones(1, dtype=torch.bool), no_fingers=True)
    assert head[0, i("Head")] > 0.99
