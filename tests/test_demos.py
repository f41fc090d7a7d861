"""Every CPU-runnable example workflow runs headless on the tiny models its DemoCase builds."""

from __future__ import annotations

import io
import os

import pytest
from slipstream.runner import cli
from slipstream.runner.demos import demo_cases

CASES = demo_cases()


def test_demo_workflows_exist():
    for case in CASES:
        assert (cli.WORKFLOWS / case.workflow).exists(), case.workflow


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_demo_runs_end_to_end(case, workdirs):
    case.prepare(workdirs["models"], workdirs["input"])
    out = io.StringIO()
    files = cli.run_file(cli.WORKFLOWS / case.workflow, out=out)
    assert files, f"{case.name} produced no output file:\n{out.getvalue()}"
    for path in files:
        assert os.path.getsize(path) > 0, path
