"""The transformers Wav2Vec2Model, the independent reference the speech-encoder tests compare against.

transformers (a test-only dependency) imports a package called `kernels`; the repository root, which
pytest puts on sys.path, holds one of ours by that name. The import below hides the repository root
(and any `kernels` module already imported from it) for as long as transformers loads.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _is_repo(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == REPO_ROOT
    except OSError:
        return False


def import_hf_wav2vec2():
    """(transformers.Wav2Vec2Config, transformers.Wav2Vec2Model), or skip the test when transformers is absent."""
    saved_path = list(sys.path)
    ours = sys.modules.get("kernels")
    if ours is not None and Path(getattr(ours, "__file__", "") or "").resolve().parent.parent == REPO_ROOT:
        del sys.modules["kernels"]
    else:
        ours = None
    sys.path[:] = [p for p in sys.path if not _is_repo(p)]
    try:
        transformers = pytest.importorskip("transformers")
        modeling = importlib.import_module("transformers.models.wav2vec2.modeling_wav2vec2")
        return transformers.Wav2Vec2Config, modeling.Wav2Vec2Model
    finally:
        sys.path[:] = saved_path
        if ours is not None:
            sys.modules.setdefault("kernels", ours)
