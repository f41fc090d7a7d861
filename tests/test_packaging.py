"""What users and installers read before any node runs: pyproject, requirements.txt, the registry icon,
and the README's test command in a clone whose folder name is not a Python identifier."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def _requirement_name(line: str) -> str:
    return re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_txt_matches_project_dependencies_without_torch():
    lines = [ln.strip() for ln in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    requirements = [ln for ln in lines if ln and not ln.startswith("#")]
    assert requirements == PYPROJECT["project"]["dependencies"], "requirements.txt and [project] dependencies differ"
    assert not TORCH_FAMILY & {_requirement_name(r) for r in requirements}, "ComfyUI owns the torch install"


def test_project_metadata_for_pip_and_the_registry():
    project = PYPROJECT["project"]
    assert project["name"] == "slipstream"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "the registry wants X.Y.Z"
    assert (REPO / project["license"]["file"]).read_text(encoding="utf-8").lstrip().startswith(
        "GNU GENERAL PUBLIC LICENSE")
    assert project["requires-python"].startswith(">=")
    extras = project["optional-dependencies"]
    assert {_requirement_name(r) for r in extras["fast"]} == {"flash-attn", "sageattention", "triton"}
    assert {"pytest", "ruff"} <= {_requirement_name(r) for r in extras["test"]}
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Slipstream"
    assert comfy["requires-comfyui"] == ">=0.8.0"
    assert all((REPO / d).is_dir() for d in comfy["includes"])
    assert not (REPO / "install.py").exists()


def test_registry_icon_url_names_a_file_in_the_repo():
    """The registry shows the Icon URL; it points into this repository's main branch, so the file must exist."""
    from PIL import Image

    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    repo_url = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo_url}/main/"
    assert icon.startswith(prefix), icon
    with Image.open(REPO / icon.removeprefix(prefix)) as image:
        assert image.width <= 800 and image.height <= 400, "the registry's limit is 800x400"


def test_setuptools_lists_every_subpackage():
    """A sub-package missing from [tool.setuptools] packages is absent from a non-editable install."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {"slipstream"}
    tops = [d for d in REPO.iterdir() if (d / "__init__.py").is_file() and d.name not in {"tests", "build", "dist"}]
    for top in tops:
        for init in top.rglob("__init__.py"):
            found.add(".".join(("slipstream", *init.parent.relative_to(REPO).parts)))
    assert found == listed


def test_tests_run_in_a_clone_whose_folder_is_not_an_identifier(tmp_path):
    """`git clone .../ComfyUI-Slipstream` gives a folder with a hyphen; the README's pytest command must still work.

    pytest imports the repo root's __init__.py by itself (the root is a Package node); conftest makes
    that import find the package it already loaded instead of failing on the relative imports.
    """
    clone = tmp_path / "ComfyUI-Slipstream"
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "workflows", "web", "benchmarks", "tests")
    shutil.copytree(REPO, clone, ignore=ignore)
    (clone / "tests").mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", clone / "tests" / "conftest.py")
    (clone / "tests" / "test_probe.py").write_text(
        "import slipstream\n\n\ndef test_probe():\n    assert 'SlipstreamVideoCombine' in slipstream.NODE_CLASS_MAPPINGS\n",
        encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_probe.py"], cwd=clone,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout


def test_every_node_has_a_help_page_and_every_page_a_node():
    """ComfyUI's docs panel reads web/docs/<node id>.md; a renamed node would silently lose its page."""
    import slipstream

    pages = {p.stem for p in (REPO / "web" / "docs").glob("*.md")}
    assert pages == set(slipstream.NODE_CLASS_MAPPINGS)
    for node_id in pages:
        text = (REPO / "web" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")
        assert text.startswith("# ") and re.search(r"^## Inputs?$", text, re.M), f"web/docs/{node_id}.md: no Inputs section"
