"""Every node class's INPUT_TYPES and FUNCTION method carries a return annotation, so a node's contract
(a dict of inputs in, a tuple of outputs or a ui dict back) is readable and checked by type tools."""

import ast
from pathlib import Path

NODES = Path(__file__).resolve().parent.parent / "nodes"


def _unannotated() -> list[str]:
    missing = []
    for path in sorted(NODES.glob("*.py")):
        for cls in (n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)):
            function = next((s.value.value for s in cls.body if isinstance(s, ast.Assign)
                             and any(getattr(t, "id", None) == "FUNCTION" for t in s.targets)), None)
            for item in cls.body:
                if (isinstance(item, ast.FunctionDef) and item.name in ("INPUT_TYPES", function)
                        and item.returns is None):
                    missing.append(f"{path.name}:{item.lineno} {cls.name}.{item.name}")
    return missing


def test_node_methods_have_return_annotations():
    assert _unannotated() == []


def test_scan_sees_node_classes():
    names = {cls.name for path in NODES.glob("*.py") for cls in ast.parse(path.read_text()).body
             if isinstance(cls, ast.ClassDef)}
    assert {"WanSampler", "WanModelLoader", "MemoryCleanup"} <= names
