"""MIA nodes end to end in the standalone host: the example workflow's API twin, mesh I/O, output naming."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.mia import gltf
from slipstream.models.mia.humanoid import make_humanoid
from slipstream.models.mia.mesh import MeshError, as_triangle_mesh, load_mesh
from slipstream.nodes import NODE_CLASS_MAPPINGS
from slipstream.runner.demos import demo_cases

REPO = Path(__file__).resolve().parent.parent


def _run_api_workflow(path: Path) -> dict[str, object]:
    """Execute an API-format workflow of our nodes in id order (enough for this linear graph)."""
    graph = json.loads(path.read_text())
    results: dict[str, tuple] = {}
    uis: dict[str, object] = {}
    for node_id in sorted(graph, key=int):
        spec = graph[node_id]
        cls = NODE_CLASS_MAPPINGS[spec["class_type"]]
        kwargs = {k: results[v[0]][v[1]] if isinstance(v, list) else v for k, v in spec["inputs"].items()}
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            uis[node_id] = out["ui"]
            out = out["result"]
        results[node_id] = out
    return {"results": results, "ui": uis}


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("mia_demo")
    case = next(c for c in demo_cases() if c.name == "mia_rig")
    (root / "models").mkdir()
    (root / "input").mkdir()
    case.prepare(root / "models", root / "input")
    return root


def test_example_workflow_runs_and_never_overwrites(demo_tree, workdirs, monkeypatch, caplog):
    monkeypatch.setenv("SLIPSTREAM_MODELS", str(demo_tree / "models"))
    monkeypatch.setenv("SLIPSTREAM_INPUT", str(demo_tree / "input"))
    monkeypatch.delenv("MIA_MODELS_PATH", raising=False)
    api = REPO / "workflows" / "mia_rig_api.json"
    first = _run_api_workflow(api)
    with caplog.at_level(logging.INFO, logger="slipstream.hub"):
        second = _run_api_workflow(api)
    assert "Using cached models" in caplog.text
    glb1, fbx1 = first["results"]["3"]
    glb2, _ = second["results"]["3"]
    assert glb1 == "3d/mia_demo_00001_.glb" and glb2 == "3d/mia_demo_00002_.glb"
    assert first["ui"]["3"] == {"3d": [{"filename": "mia_demo_00001_.glb", "subfolder": "3d", "type": "output"}]}
    assert fbx1 == ("" if not gltf.fbx_available() else fbx1)
    out = workdirs["output"] / glb1
    doc, binary = gltf.read_glb(out.read_bytes())
    assert len(doc["skins"][0]["joints"]) == 22
    assert not list((workdirs["output"] / "3d").glob(".*partial*"))
    handle = first["results"]["2"][0]
    assert handle.dtype == torch.float32 and handle.attn_backend == "sdpa"


def test_ui_workflow_matches_api_twin():
    ui = json.loads((REPO / "workflows" / "mia_rig.json").read_text())
    api = json.loads((REPO / "workflows" / "mia_rig_api.json").read_text())
    assert sorted(n["type"] for n in ui["nodes"]) == sorted(v["class_type"] for v in api.values())
    for node in ui["nodes"]:
        cls = NODE_CLASS_MAPPINGS[node["type"]]
        spec = cls.INPUT_TYPES()
        widgets = [k for sec in ("required", "optional") for k, v in spec.get(sec, {}).items()
                   if isinstance(v[0], list) or v[0] in ("STRING", "BOOLEAN", "INT", "FLOAT")]
        api_inputs = api[str(node["id"])]["inputs"]
        assert node["widgets_values"] == [api_inputs[k] for k in widgets]
        assert node["properties"]["cnr_id"] == "slipstream"


@pytest.mark.parametrize("ext", ["glb", "obj", "ply", "stl"])
def test_mesh_files_load_without_reordering(tmp_path, ext):
    mesh = make_humanoid(textured=ext in ("glb", "obj"))
    path = tmp_path / f"figure.{ext}"
    mesh.export(path)
    loaded = load_mesh(str(path))
    assert len(loaded.faces) == len(mesh.faces)
    if ext in ("glb", "ply"):
        assert np.allclose(loaded.vertices, mesh.vertices, atol=1e-6)


def test_core_mesh_values_and_bad_inputs():
    mesh = make_humanoid(textured=False)
    core = SimpleNamespace(vertices=torch.tensor(mesh.vertices, dtype=torch.float32)[None],
                           faces=torch.tensor(mesh.faces)[None])
    converted = as_triangle_mesh(core)
    assert np.allclose(converted.vertices, mesh.vertices, atol=1e-6) and len(converted.faces) == len(mesh.faces)
    with pytest.raises(MeshError, match="no faces"):
        as_triangle_mesh(trimesh.Trimesh(mesh.vertices, np.zeros((0, 3), dtype=int), process=False))
    with pytest.raises(MeshError, match="not a supported mesh file"):
        load_mesh("character.fbx")


def test_load_mesh_node_lists_input_3d(workdirs):
    (workdirs["input"] / "3d").mkdir()
    make_humanoid(textured=False).export(workdirs["input"] / "3d" / "a.stl")
    node = NODE_CLASS_MAPPINGS["SlipstreamLoadMesh"]
    assert node.INPUT_TYPES()["required"]["mesh_file"][0] == ["3d/a.stl"]
    assert len(node().load("3d/a.stl")[0].faces) > 0


def test_bw_normal_is_built_only_when_a_rig_uses_normals(demo_tree, workdirs, monkeypatch):
    monkeypatch.setenv("SLIPSTREAM_MODELS", str(demo_tree / "models"))
    monkeypatch.delenv("MIA_MODELS_PATH", raising=False)
    from slipstream.models.mia import weights

    built: list[str] = []
    real_build = weights.build_network

    def recording_build(name, *args, **kwargs):
        built.append(name)
        return real_build(name, *args, **kwargs)

    monkeypatch.setattr(weights, "build_network", recording_build)
    (handle,) = NODE_CLASS_MAPPINGS["MIALoadModel"]().load("fp32", "sdpa")
    assert sorted(built) == ["bw", "joints", "joints_coarse", "pose"]
    assert not handle.bw_normal.loaded
    mesh = make_humanoid(textured=False)
    rigger = NODE_CLASS_MAPPINGS["MIAAutoRig"]()
    rigger.rig(mesh, handle, use_normal=False)
    assert "bw_normal" not in built and not handle.bw_normal.loaded
    rigger.rig(mesh, handle, use_normal=True)
    rigger.rig(mesh, handle, use_normal=True)
    assert built.count("bw_normal") == 1 and handle.bw_normal.loaded


def test_every_network_goes_through_the_host_model_manager(demo_tree, workdirs, monkeypatch):
    """Each rig asks the host to load exactly the networks it uses (inside ComfyUI: load_models_gpu)."""
    monkeypatch.setenv("SLIPSTREAM_MODELS", str(demo_tree / "models"))
    monkeypatch.delenv("MIA_MODELS_PATH", raising=False)
    from slipstream.nodes import mia as mia_nodes

    managed: list = []
    loads: list[list[str]] = []
    real_manage, real_load = mia_nodes.manage_module, mia_nodes.load_managed
    monkeypatch.setattr(mia_nodes, "manage_module", lambda net: managed.append(net) or real_manage(net))

    def recording_load(items):
        items = list(items)
        loads.append(sorted(name for name, h in handle.managed.items() if any(h is i for i in items)))
        real_load(items)

    monkeypatch.setattr(mia_nodes, "load_managed", recording_load)
    (handle,) = NODE_CLASS_MAPPINGS["MIALoadModel"]().load("fp32", "sdpa")
    assert sorted(handle.managed) == ["bw", "joints", "joints_coarse", "pose"]
    assert [id(n) for n in managed] == [id(handle.managed[k]) for k in handle.managed]
    mesh = make_humanoid(textured=False)
    rigger = NODE_CLASS_MAPPINGS["MIAAutoRig"]()
    rigger.rig(mesh, handle, use_normal=False)
    assert loads == [["bw", "joints", "joints_coarse", "pose"]]
    rigger.rig(mesh, handle, use_normal=True)
    assert handle.managed["bw_normal"] is handle.bw_normal.get()
    assert loads[-1] == ["bw", "bw_normal", "joints", "joints_coarse", "pose"]


def test_a_damaged_bw_normal_file_is_reported_when_the_model_loads(demo_tree, tmp_path, workdirs, monkeypatch):
    cache = tmp_path / "mia"
    shutil.copytree(demo_tree / "models" / "mia", cache)
    normal = cache / "bw_normal.safetensors"
    normal.write_bytes(normal.read_bytes()[:-100])
    monkeypatch.setenv("MIA_MODELS_PATH", str(cache))
    with pytest.raises(CheckpointError, match="truncated"):
        NODE_CLASS_MAPPINGS["MIALoadModel"]().load("fp32", "sdpa")


def test_importing_the_pack_does_not_import_trimesh():
    """trimesh costs ~0.7 s of ComfyUI start-up; it loads when a mesh is first touched."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import conftest, slipstream.nodes; "
             "assert 'trimesh' not in sys.modules, 'imported at start-up'; "
             "from slipstream.models.mia.mesh import as_triangle_mesh; "
             "from slipstream.models.mia.lazy_trimesh import trimesh; "
             "m = as_triangle_mesh(trimesh.creation.box()); assert 'trimesh' in sys.modules and len(m.faces) == 12")
    done = subprocess.run([sys.executable, "-c", probe, str(root / "tests")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
