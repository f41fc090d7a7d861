"""A reader of the repository alone can follow every reference in it.

Code, docs and tests must not point at documents that are not in the repository (design notes or fact
sheets kept elsewhere, cited by file name and section number), at one machine's paths, or at the tracker's history:
a maintainer needs the point itself, written where it applies.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".sh", ".yml", ".yaml", ".js", ".html", ""}
# The patterns are assembled from pieces so this file does not itself hold the references it forbids.
_DOC = r"\.m" + "d"
_OUTSIDE_DOCS = r"\b(?:int8|wan|comfyui|offload|mia|anima)" + _DOC + r"\b"
_MACHINE = r"(?<![\w.])/" + "work/|heavy" + r"\.lock"
FORBIDDEN = {
    "a design or spec document kept outside the repository": re.compile(
        r"\bDESIGN" + _DOC + r"\b|shared/" + "specs|" + _OUTSIDE_DOCS),
    "a numbered section of a document kept outside the repository": re.compile("\u00a7" + r"\s?\d|" + "\u00a7"
                                                                                 + r"\s?[A-Z]\.\d"),
    "a path of one development machine": re.compile(_MACHINE),
    "the issue tracker instead of the point itself": re.compile(r"\bthe [A-Z][a-z]+ issue\b|\bissue #?\d+\b"),
}


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):   # an exported tree without git: walk it
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts
                 and ".venv" not in p.parts]
    here = Path(__file__).resolve()
    return [REPO / n for n in names if Path(n).suffix in TEXT_SUFFIXES and (REPO / n).resolve() != here
            and (REPO / n).is_file()]


def references(text: str) -> list[tuple[int, str, str]]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for why, pattern in FORBIDDEN.items():
            if pattern.search(line):
                found.append((number, why, line.strip()[:120]))
    return found


def test_every_reference_can_be_followed_inside_the_repository():
    problems = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        problems += [f"{path.relative_to(REPO)}:{n}: {why}: {line}" for n, why, line in references(text)]
    assert not problems, "\n".join(problems)


SECTION, DOC = "\u00a7", ".m" + "d"


@pytest.mark.parametrize("line", [
    f"see DESIGN{DOC}", f"the table in wan{DOC}", f"accurate (int8{DOC} {SECTION}4.5)",
    f"Order matters ({SECTION}A.7)", "flock /" + "work/heavy" + ".lock python benchmarks/x.py",
    "named by the Anima " + "issue", "fixed in " + "issue 12",
])
def test_the_rules_catch_what_they_claim(line):
    assert references(line)


@pytest.mark.parametrize("line", [
    "see README.md", "web/docs/SlipstreamWanSampler.md", "a Wan 2.1 VAE", "the issue's number", "homework/notes.txt",
])
def test_ordinary_lines_pass(line):
    assert not references(line)
