"""`trimesh`, imported on first use.

trimesh (with scipy behind it) takes ~0.7 s to import, and the pack is imported while ComfyUI
starts, whether or not anyone rigs a mesh that session; ComfyUI itself does not import it. The
MIA modules use `trimesh.X` through this stand-in, which imports the real module at the first
attribute access.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule:
    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


trimesh = _LazyModule("trimesh")
