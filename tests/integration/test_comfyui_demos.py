"""Every CPU-runnable example workflow (runner/demos.py) runs in a real ComfyUI through /prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from slipstream.runner.demos import demo_cases

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
CASES = demo_cases()


@pytest.mark.parametrize("case", CASES or [None], ids=lambda c: c.name if c else "none-registered")
def test_demo_workflow_runs_in_comfyui(case, comfyui, harness_module):
    if case is None:
        pytest.skip("runner/demos.py registers no DemoCase yet: no workflow to post")
    case.prepare(comfyui.models_dir, comfyui.input_dir)
    api = json.loads((WORKFLOWS / case.workflow).read_text(encoding="utf-8"))
    entry = comfyui.run(api, timeout=600)
    assert entry["status"]["status_str"] == "success"
    files = harness_module.output_files(entry, comfyui.base)
    assert files, f"{case.name}: the run succeeded but named no output file: {entry.get('outputs')}"
    for path in files:
        assert path.is_file() and path.stat().st_size > 0, f"{case.name}: {path} missing or empty"
