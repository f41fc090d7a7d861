"""/object_info of a real ComfyUI shows every node of ours exactly as our classes declare it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def expected_info(node_id: str, cls: type, display: str, folder: str) -> dict:
    """What ComfyUI's server must publish for a V1 node (server.py node_info), JSON-normalised."""
    spec = cls.INPUT_TYPES()
    n = len(cls.RETURN_TYPES)
    info = {
        "input": spec,
        "input_order": {section: list(entries) for section, entries in spec.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * n)),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": node_id,
        "display_name": display,
        "description": cls.DESCRIPTION,
        "python_module": f"custom_nodes.{folder}",
        "category": cls.CATEGORY,
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        "output_tooltips": list(cls.OUTPUT_TOOLTIPS),
    }
    return json.loads(json.dumps(info))


@pytest.fixture(scope="module")
def served(comfyui, monkeypatch_module):
    # Model-file combos must list the same files on both sides: point our standalone host at the
    # server's folders before asking our classes for INPUT_TYPES.
    monkeypatch_module.setenv("SLIPSTREAM_MODELS", str(comfyui.models_dir))
    monkeypatch_module.setenv("SLIPSTREAM_INPUT", str(comfyui.input_dir))
    return comfyui.object_info()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_node_is_served_exactly(served, slip_nodes, harness_module):
    _, nodes = slip_nodes
    problems = []
    for node_id, cls, display in nodes:
        want = expected_info(node_id, cls, display, harness_module.PACK_FOLDER)
        got = served.get(node_id)
        if got is None:
            problems.append(f"{node_id}: not in /object_info")
            continue
        for key, value in want.items():
            if got.get(key) != value:
                problems.append(f"{node_id}.{key}:\n  ComfyUI: {json.dumps(got.get(key))[:800]}\n"
                                f"  ours:    {json.dumps(value)[:800]}")
    assert not problems, "\n".join(problems)


def test_no_core_node_is_shadowed(served, slip_nodes):
    slipstream, nodes = slip_nodes
    ours = {node_id for node_id, _, _ in nodes}
    foreign = {k for k, v in served.items() if not v["python_module"].startswith("custom_nodes.")}
    assert not ours & foreign


def test_help_pages_are_served(comfyui, slip_nodes, harness_module):
    _, nodes = slip_nodes
    for node_id, _, _ in nodes:
        page = REPO_ROOT / "web" / "docs" / f"{node_id}.md"
        assert page.is_file(), f"{node_id} has no help page web/docs/{node_id}.md"
        url = f"{comfyui.url}/extensions/{harness_module.PACK_FOLDER}/docs/{node_id}.md"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200
            assert resp.read().decode("utf-8") == page.read_text(encoding="utf-8")
