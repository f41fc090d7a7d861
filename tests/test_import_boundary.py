"""Only host/ may import ComfyUI; kernels/ imports nothing of ours; arrows point one way (nodes → models/host → kernels);
nodes/ go through the host package's interface (host/__init__.py, plus the pure helpers in host/paths.py), never
into its ComfyUI or plain-process implementations."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMFY_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "nodes",
                 "execution", "node_helpers", "latent_preview"}
SKIP_DIRS = {"tests", ".git", ".venv", "build", "dist", "__pycache__", "web", "workflows"}


def _python_files():
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in SKIP_DIRS or any(p.startswith(".") for p in rel.parts):
            continue
        yield rel, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imports(tree: ast.AST):
    """(level, module name) for every import; `from .. import host` yields the name imported (host)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                yield node.level, node.module
            else:
                for alias in node.names:
                    yield node.level, alias.name


def test_only_host_imports_comfyui():
    offenders = []
    for rel, tree in _python_files():
        if rel.parts[0] == "host":
            continue
        for level, name in _imports(tree):
            if level == 0 and name.split(".")[0] in COMFY_MODULES:
                offenders.append(f"{rel}: import {name}")
    assert not offenders, "ComfyUI imported outside host/:\n" + "\n".join(offenders)


def _package_of(rel: Path, level: int, name: str) -> str | None:
    """The top-level folder of ours that a relative import reaches, or None for absolute imports."""
    if level == 0:
        return None
    parts = list(rel.parts[:-1])
    up = level - 1
    base = parts[: len(parts) - up] if up else parts
    target = base + (name.split(".") if name else [])
    return target[0] if target else "__init__"


def test_layers_point_one_way():
    allowed = {
        "kernels": {"kernels"},
        "models": {"models", "kernels"},
        "host": {"host", "kernels"},
        "nodes": {"nodes", "models", "kernels", "host"},
    }
    offenders = []
    for rel, tree in _python_files():
        layer = rel.parts[0] if len(rel.parts) > 1 else None
        if layer not in allowed:
            continue
        for level, name in _imports(tree):
            target = _package_of(rel, level, name)
            if target is not None and target not in allowed[layer]:
                offenders.append(f"{rel} imports {'.' * level}{name} ({layer} -> {target})")
    assert not offenders, "\n".join(offenders)



# The host modules a node may import by name: the interface (host/__init__.py) and its pure path helpers.
NODE_VISIBLE_HOST_MODULES = {"paths"}


def _host_modules_named(rel: Path, tree: ast.AST):
    """Every host submodule a file under nodes/ imports: `from ..host.x import …`, `from ..host import x`."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or _package_of(rel, node.level, node.module or "") != "host":
            continue
        parts = (node.module or "").split(".")
        if len(parts) > 1:
            yield parts[1]
        elif node.module == "host" or (node.module is None and node.level):
            host_py = REPO / "host"
            yield from (a.name for a in node.names if (host_py / f"{a.name}.py").exists())


def test_nodes_use_only_the_host_interface():
    offenders = []
    for rel, tree in _python_files():
        if rel.parts[0] != "nodes":
            continue
        for name in _host_modules_named(rel, tree):
            if name not in NODE_VISIBLE_HOST_MODULES:
                offenders.append(f"{rel} imports host.{name}")
    assert not offenders, ("nodes/ must reach ComfyUI and the plain-process stand-ins through host/__init__.py's "
                           "functions:\n" + "\n".join(offenders))


def test_the_node_rule_sees_a_direct_host_import():
    tree = ast.parse("from ..host import comfy_anima\nfrom ..host.graph_values import CLIP\nfrom ..host import NAME\n")
    assert sorted(_host_modules_named(Path("nodes/x.py"), tree)) == ["comfy_anima", "graph_values"]
