"""Example workflows: UI files load in ComfyUI's frontend shape, API twins match them and our nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from slipstream import NODE_CLASS_MAPPINGS

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))
API_FILES = sorted(WORKFLOWS.glob("*_api.json"))
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
# The frontend adds a "control after generate" widget value after these INT inputs.
SEED_NAMES = {"seed", "noise_seed"}


def _widget_names(cls) -> list[str]:
    spec = cls.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 else {}
            if (isinstance(kind, list) or kind in WIDGET_KINDS) and not opts.get("forceInput"):
                names.append(name)
                if kind == "INT" and (name in SEED_NAMES or opts.get("control_after_generate")):
                    names.append(f"{name}:control_after_generate")
    return names


def test_every_ui_workflow_has_an_api_twin():
    for ui in UI_FILES:
        assert (WORKFLOWS / f"{ui.stem}_api.json").exists(), f"{ui.name} has no API twin"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_structure(path):
    wf = json.loads(path.read_text())
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        assert key in wf, f"{path.name}: missing '{key}'"
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert max(nodes) <= wf["last_node_id"]
    link_ids = set()
    for link in wf["links"]:
        link_id, src, src_slot, dst, dst_slot, kind = link
        link_ids.add(link_id)
        assert src in nodes and dst in nodes, f"{path.name}: link {link_id} names a missing node"
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id, f"{path.name}: link {link_id} target mismatch"
        assert link_id in (nodes[src]["outputs"][src_slot].get("links") or []), f"{path.name}: link {link_id} source"
        assert nodes[src]["outputs"][src_slot]["type"] == kind or kind == "*"
    assert not link_ids or max(link_ids) <= wf["last_link_id"]
    for node in wf["nodes"]:
        cls = NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            continue  # a core ComfyUI node; its widgets are ComfyUI's business
        assert node.get("properties", {}).get("Node name for S&R") == node["type"]
        names = _widget_names(cls)
        values = node.get("widgets_values", [])
        assert len(values) == len(names), f"{path.name} node {node['id']} ({node['type']}): " \
                                          f"{len(values)} widget values for widgets {names}"
        returns = list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
        assert [o["type"] for o in node.get("outputs", [])] == list(cls.RETURN_TYPES), f"{node['type']} outputs"
        assert [o["name"] for o in node.get("outputs", [])] == returns


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_twin_matches_ui(path):
    api = json.loads(path.read_text())
    ui_path = WORKFLOWS / path.name.replace("_api.json", ".json")
    assert ui_path.exists(), f"{path.name} has no UI-format original"
    ui = json.loads(ui_path.read_text())
    assert sorted(n["class_type"] for n in api.values()) == sorted(n["type"] for n in ui["nodes"])
    for node_id, node in api.items():
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        known = set(spec.get("required", {})) | set(spec.get("optional", {}))
        assert set(node["inputs"]) <= known, f"{path.name} node {node_id}: unknown inputs {set(node['inputs']) - known}"
        assert set(spec.get("required", {})) <= set(node["inputs"]), f"{path.name} node {node_id}: missing inputs"


# The API twins run on CPU with tiny models, so they name other files and shrink the work; every
# other widget value must be the one the user sees in the UI file.
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".gguf", ".png", ".jpg", ".glb", ".obj", ".fbx")
SCALED_FOR_CPU = {"width", "height", "num_frames", "length", "steps", "blocks_to_swap", "motion_frames"}


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_api_twin_has_the_ui_widget_values(path):
    ui = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / f"{path.stem}_api.json").read_text())
    for node in ui["nodes"]:
        twin = api.get(str(node["id"]))
        assert twin is not None and twin["class_type"] == node["type"], f"{path.name}: node {node['id']} has no twin"
        cls = NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            continue
        for name, value in zip(_widget_names(cls), node.get("widgets_values", []), strict=True):
            if name.endswith(":control_after_generate") or name not in twin["inputs"]:
                continue  # a widget converted to an input is linked in both files (checked by the link tests)
            api_value = twin["inputs"][name]
            if api_value == value or name in SCALED_FOR_CPU:
                continue
            assert isinstance(value, str) and value.lower().endswith(FILE_SUFFIXES), (
                f"{path.name} node {node['id']} ({node['type']}).{name}: UI {value!r}, API twin {api_value!r}")
