"""The README's node table and commands stay true to the code, so a reader can trust it without running anything."""

from __future__ import annotations

import re
from pathlib import Path

from slipstream.nodes import NODES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_node_in_readme_table():
    rows = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+?) \|", README, flags=re.M))
    for node_id, cls, display in NODES:
        assert rows.get(node_id) == display, f"README node table lacks {node_id} ({display})"
        assert f"| {cls.CATEGORY} |" in README
    assert set(rows) == {node_id for node_id, _, _ in NODES}


def test_ci_reads_the_test_command_from_readme():
    block = README.split("<!-- ci:test-command -->", 1)[1].splitlines()
    assert block[1] == "```bash" and block[2].startswith("python -m pytest")
