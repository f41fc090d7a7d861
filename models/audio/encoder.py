"""The speech encoder the talking-head families share: a loaded wav2vec2 plus what its input must look like.

Whether a model wants its waveform normalised (zero mean, unit variance over the clip) is part of its
Hugging Face preprocessor config, which model files do not carry: chinese-wav2vec2-base says no
(do_normalize false), wav2vec2-base-960h and the large models say yes. `load_speech_encoder` decides
from what the file shows (see `normalization_for`); callers who know better pass `normalize=`.
"""

from __future__ import annotations

import os
from collections.abc import Collection

import torch

from ..wan.weights import TensorTable, find_prefix
from .wav2vec2 import _ANCHORS, Wav2Vec2


class SpeechEncoder(Wav2Vec2):
    """A loaded wav2vec2 with its file name and input convention.

    `name`: the file stem. `expects_normalized`: normalise the waveform before encoding (as the model's
    HF feature extractor does). `normalization_reason`: why that was decided, for the user.
    `compute_device`: where the feature functions run it (None: where it is); with `offload` they send
    it back to where it was afterwards, so it does not sit in VRAM while the video model samples.
    """

    name: str = ""
    expects_normalized: bool = True
    normalization_reason: str = ""
    compute_device: torch.device | None = None
    offload: bool = True


def normalization_for(path: str, keys: Collection[str]) -> tuple[bool, str]:
    """(expects_normalized, why) from a checkpoint's name and keys.

    In order: a CTC head (`lm_head`, the facebook fine-tunes such as wav2vec2-base-960h) -> yes; a name
    with "chinese" (TencentGameMate/chinese-wav2vec2-base, ComfyUI's wav2vec2-chinese-base) -> no; a
    "layer"-norm feature extractor (large models, all trained on normalised input) -> yes; a name with
    "960h" or "english" -> yes; otherwise yes, the HF feature extractor's default.
    """
    stem = os.path.basename(path).lower()
    if any(k.endswith("lm_head.weight") for k in keys):
        return True, "a CTC fine-tune (lm_head present), trained on normalised audio like wav2vec2-base-960h"
    if "chinese" in stem:
        return False, "chinese-wav2vec2-base, whose preprocessor does not normalise (do_normalize false)"
    if any(k.endswith("feature_extractor.conv_layers.1.layer_norm.weight") for k in keys):
        return True, "a layer-norm (large) wav2vec2, trained on normalised audio"
    if "960h" in stem or "english" in stem:
        return True, "a wav2vec2-base-960h / English model, trained on normalised audio"
    return True, "unknown wav2vec2 file: normalised, the Hugging Face feature extractor's default"


def load_speech_encoder(path: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                        *, normalize: bool | None = None, num_heads: int | None = None) -> SpeechEncoder:
    """Load a wav2vec2 checkpoint (safetensors or a pickled pytorch_model.bin; HF key names with or without
    a `wav2vec2.` prefix) as a SpeechEncoder in `dtype` on `device` (default CPU), frozen, in eval mode.

    `normalize` overrides the input normalisation decided by `normalization_for`; `num_heads` the head
    count (width / 64 unless given; checkpoints do not store it). Raises CheckpointError naming what is
    wrong with a file that is no wav2vec2, damaged, truncated, or missing / misshaping tensors.
    """
    table = TensorTable.from_file(path)
    found = find_prefix(table.shapes, _ANCHORS)
    own = table.shapes if found is None else [k[len(found[0]):] for k in table.shapes if k.startswith(found[0])]
    expects, reason = normalization_for(path, list(table.shapes) + list(own))
    encoder = SpeechEncoder._load(table, dtype, device, None, {"num_heads": num_heads})
    encoder.requires_grad_(False).eval()
    encoder.name = os.path.splitext(os.path.basename(path))[0]
    if normalize is None:
        encoder.expects_normalized, encoder.normalization_reason = expects, reason
    else:
        encoder.expects_normalized = bool(normalize)
        encoder.normalization_reason = "set by the caller"
    return encoder
