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
    """(Wav2Vec2Config, Wav2Vec2Model, Wav2Vec2FeatureExtractor) of transformers, or skip the test when
    transformers is absent."""
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
        extraction = importlib.import_module("transformers.models.wav2vec2.feature_extraction_wav2vec2")
        return transformers.Wav2Vec2Config, modeling.Wav2Vec2Model, extraction.Wav2Vec2FeatureExtractor
    finally:
        sys.path[:] = saved_path
        if ours is not None:
            sys.modules.setdefault("kernels", ours)


def hf_model(sd, variant: str = "base"):
    """transformers' Wav2Vec2Model for the tiny spec (speech_fixtures.TINY_BASE) holding the tensors `sd`
    (names without prefix; either weight-norm key style), in eval mode."""
    from speech_fixtures import TINY_BASE, hf_config_kwargs

    config_cls, model_cls, _ = import_hf_wav2vec2()
    model = model_cls(config_cls(**hf_config_kwargs(TINY_BASE, variant))).eval()
    own = model.state_dict()
    pos = "encoder.pos_conv_embed.conv."
    sd = dict(sd)
    # transformers names the weight-normed conv the way its torch does; hand it the pair that way.
    if pos + "weight_g" in sd and pos + "weight_g" not in own:
        sd[pos + "parametrizations.weight.original0"] = sd.pop(pos + "weight_g")
        sd[pos + "parametrizations.weight.original1"] = sd.pop(pos + "weight_v")
    model.load_state_dict(sd, strict=True)
    return model
