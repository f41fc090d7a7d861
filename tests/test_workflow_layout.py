"""Every UI workflow opens cleanly: download links for its models, no node over another, all in view.

These read the geometry stored in the files; tests/integration/test_comfyui_frontend.py checks the same
rules on what ComfyUI's frontend really draws.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from workflow_layout import model_entry_problems, outside_safe_area, overlapping_pairs, stored_rect  # noqa: E402

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_model_entries_carry_download_links(path):
    problems = [p for node in _load(path)["nodes"] for p in model_entry_problems(node)]
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_no_node_covers_another(path):
    nodes = _load(path)["nodes"]
    pairs = overlapping_pairs({n["id"]: stored_rect(n) for n in nodes})
    assert not pairs, f"{path.name}: overlapping nodes {pairs}"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_saved_view_shows_every_node(path):
    wf = _load(path)
    ds = wf.get("extra", {}).get("ds")
    assert ds, f"{path.name}: no saved view (extra.ds), so the frontend opens it wherever it was last"
    hidden = outside_safe_area({n["id"]: stored_rect(n) for n in wf["nodes"]}, ds["offset"], ds["scale"])
    assert not hidden, f"{path.name}: nodes {hidden} open outside the visible canvas (fix extra.ds)"


def test_rules_catch_what_they_claim():
    """The geometry rules fail on the cases they exist for (overlap, hidden title bar, missing url)."""
    a = {"id": 1, "type": "X", "pos": [0, 60], "size": [100, 100]}
    b = {"id": 2, "type": "X", "pos": [50, 170], "size": [100, 100]}   # its title bar reaches into a
    assert overlapping_pairs({1: stored_rect(a), 2: stored_rect(b)}) == [(1, 2)]
    assert outside_safe_area({1: stored_rect(a)}, [70, 80], 1.0) == []
    assert outside_safe_area({1: stored_rect(a)}, [70, 0], 1.0) == [1]   # title bar under the tab bar
    node = {"id": 3, "type": "X", "widgets_values": ["m.safetensors"],
            "properties": {"models": [{"name": "m.safetensors", "directory": "vae"}]}}
    assert any("no url" in p for p in model_entry_problems(node))
