"""Every bad input a loader, encoder, trainer or rigger node can be given ends in the pack's own error,
naming the file or input and the fix; nothing is published that holds non-finite numbers.

The table feeds each case through the node classes on small real files written here (safetensors
with damaged headers, legacy and zip .pth pickles, an HTML page saved under a model's name,
truncated PNGs, meshes). Cases that need no model run with `None` for the model inputs: the node
must refuse before it touches them, so no time is spent on a run that cannot succeed.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from slipstream.kernels.attention import AttentionBackendUnavailable
from slipstream.models.anima.errors import (
    IncompatibleModelArchitecture,
    InvalidReferenceImageFile,
    InvalidTrainingSetting,
    TokenOptimizationFailed,
)
from slipstream.models.anima.tiny import write_tiny_anima
from slipstream.models.checkpoint import CheckpointError
from slipstream.models.finite import NonFiniteError
from slipstream.models.mia.humanoid import make_humanoid
from slipstream.models.mia.lazy_trimesh import trimesh
from slipstream.models.mia.mesh import MAX_RIG_VERTICES, MeshError
from slipstream.models.wan import demo_assets
from slipstream.models.wan.config import tiny as tiny_wan
from slipstream.models.wan.dit import random_state_dict
from slipstream.models.wan.errors import WanInputError

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from bad_input_cases import BadInput, assert_bad_input, cases_param  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TRAIN = dict(training_prompt="a character", seed=0, training_steps=2, learning_rate=0.01, training_image_size=64,
             num_tokens=2, init_std=0.02, training_dtype="fp32")


# -- files written by the cases -------------------------------------------------------------------

def _raw_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    """A safetensors file with exactly this JSON header (valid JSON, wrong shape is the point)."""
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _dit_file(root: Path, name: str, header: object, data: bytes = b"") -> str:
    _raw_safetensors(root / "models" / "diffusion_models" / name, header, data)
    return name


def _anima_dit(root: Path, name: str, header: object, data: bytes = b"") -> None:
    from slipstream.nodes.anima_loaders import SlipstreamAnimaModelLoader

    SlipstreamAnimaModelLoader().load(_dit_file(root, name, header, data), "default")


def _good_entry(n: int = 4) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}


def _vae_file(root: Path, name: str, payload: bytes) -> str:
    path = root / "models" / "vae" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return name


def _wan_vae(root: Path, name: str) -> None:
    from slipstream.nodes.wan_encoders import WanVAELoader

    WanVAELoader().load(name, "fp32")


class _Marker:
    """A pickle that, if it were ever unpickled with code allowed, would create a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_pth(root: Path, zipped: bool) -> None:
    marker = root / "pwned"
    path = root / "models" / "vae" / "evil.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Marker(str(marker))}, path, _use_new_zipfile_serialization=zipped)
    try:
        _wan_vae(root, "evil.pth")
    finally:
        assert not marker.exists(), "a malicious pickle ran"


def _truncated_legacy_pth(root: Path) -> None:
    path = root / "models" / "vae" / "cut.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.ones(4096)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:5000])
    _wan_vae(root, "cut.pth")


def _context_file(root: Path, name: str, meta: dict[str, str] | None = None, tokens: torch.Tensor | None = None,
                  raw: bytes | None = None) -> None:
    from slipstream.nodes.anima import SlipstreamAnimaLoadReferenceContext

    path = root / "input" / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        base = {"format": "slipstream.anima.reference_context", "version": "1", "steps": "4",
                "learning_rate": "0.01", "final_loss": "0.5", "reference_count": "1", "training_prompt": "x",
                "image_sizes": "[[64, 64]]"}
        save_file({"tokens": torch.zeros(2, 4, 8) if tokens is None else tokens},
                  str(path), metadata={**base, **(meta or {})})
    SlipstreamAnimaLoadReferenceContext().load(name)


def _reference_image(root: Path, name: str, payload: bytes) -> None:
    from slipstream.nodes.anima_loaders import SlipstreamLoadReferenceImage

    (root / "input" / name).write_bytes(payload)
    SlipstreamLoadReferenceImage().load(name)


def _png_bytes(size: tuple[int, int] = (32, 24)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 200, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _rig(mesh, model=None) -> None:
    from slipstream.nodes.mia import MIAAutoRig

    MIAAutoRig().rig(mesh, model)


def _mesh(vertices, faces) -> trimesh.Trimesh:
    return trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64), process=False)


def _train(**overrides) -> None:
    from slipstream.nodes.anima import AnimaFastTrainReferenceContext

    AnimaFastTrainReferenceContext().train(None, None, None, torch.rand(1, 64, 64, 3), **{**TRAIN, **overrides})


def _wan_dit_with(root: Path, dtype: torch.dtype) -> None:
    from slipstream.nodes.wan import WanModelLoader

    sd = random_state_dict(tiny_wan("t2v"))
    sd["blocks.0.norm3.weight"] = sd["blocks.0.norm3.weight"].to(dtype)
    path = root / "models" / "diffusion_models" / "odd_wan.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    WanModelLoader().load("odd_wan.safetensors", "fp32", "disabled", "offload_device")


def _anima_dit_with(root: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file
    from slipstream.nodes.anima_loaders import SlipstreamAnimaModelLoader

    files = write_tiny_anima(root / "models")
    path = root / "models" / "diffusion_models" / files.dit
    sd = load_file(str(path))
    key = next(k for k in sd if k.endswith("norm.weight") or k.endswith("layer_norm.weight"))
    sd[key] = sd[key].to(dtype)
    save_file(sd, str(path))
    SlipstreamAnimaModelLoader().load(files.dit, "default")


def _anima_text_encoder_with(root: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file
    from slipstream.nodes.anima_loaders import SlipstreamAnimaTextEncoderLoader

    files = write_tiny_anima(root / "models")
    path = root / "models" / "text_encoders" / files.text_encoder
    sd = load_file(str(path))
    key = next(k for k in sd if k.endswith("norm.weight"))
    sd[key] = sd[key].to(dtype)
    save_file(sd, str(path))
    SlipstreamAnimaTextEncoderLoader().load(files.text_encoder)


def _wan_vae_handle(root: Path):
    from slipstream.nodes.wan_encoders import WanVAELoader

    demo_assets.write_tiny_wan_models(root / "models", image_to_video=False)
    return WanVAELoader().load(demo_assets.VAE, "fp32")[0]


def _i2v_no_images(root: Path) -> None:
    from slipstream.nodes.wan_encoders import WanImageToVideoEncode

    WanImageToVideoEncode().encode(_wan_vae_handle(root), torch.zeros(0, 64, 64, 3), None, 64, 64, 5, 0.0, True,
                                   False)


def _clip_no_images(root: Path) -> None:
    from slipstream.nodes.wan_encoders import WanClipVisionEncode

    WanClipVisionEncode().encode(None, torch.zeros(0, 224, 224, 3), "disabled", 1.0, True)


def _decode_no_frames(root: Path) -> None:
    from slipstream.nodes.wan_encoders import WanDecode

    WanDecode().decode(_wan_vae_handle(root), {"samples": torch.zeros(1, 16, 0, 8, 8)}, False, 272, 64, True)


def _anima_model_from_int8_loader(root: Path) -> None:
    from slipstream.host.graph_values import CLIP
    from slipstream.nodes.quant import LoadDiffusionModelInt8

    files = write_tiny_anima(root / "models")
    (model,) = LoadDiffusionModelInt8().load_unet(files.dit, "default", "auto", False)
    clip = CLIP(torch.nn.Linear(1, 1), lambda t: t, lambda t: (torch.zeros(1, 3, 32), None), torch.device("cpu"),
                torch.device("cpu"))
    from slipstream.nodes.anima import AnimaFastTrainReferenceContext

    AnimaFastTrainReferenceContext().train(model, clip, None, torch.rand(1, 64, 64, 3), **TRAIN)


def _save_non_finite_context(root: Path, history: float | None = None) -> None:
    from slipstream.models.anima.context_tokens import ReferenceContext
    from slipstream.nodes.anima import SlipstreamAnimaSaveReferenceContext

    tokens = torch.zeros(2, 4, 8)
    if history is None:
        tokens[0, 0, 0] = float("nan")
    ctx = ReferenceContext(tokens=tokens, steps=1, learning_rate=0.01, final_loss=0.5, reference_count=1,
                           training_prompt="x", image_sizes=((64, 64),), loss_history=(1.0, history or 1.0))
    try:
        SlipstreamAnimaSaveReferenceContext().save(ctx, "anima_context/broken")
    finally:
        folder = root / "output" / "anima_context"
        assert not folder.exists() or not any(folder.iterdir()), "a file was left behind"


HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
CUBE = trimesh.creation.box()

CASES = [
    # -- safetensors headers (models/checkpoint.py), through Load Anima Model
    BadInput("header-entry-without-data-offsets",
             lambda r: _anima_dit(r, "no_offsets.safetensors", {"w": {"dtype": "F32", "shape": [4]}}, bytes(16)),
             CheckpointError, ("no_offsets.safetensors", "data_offsets", "fetch the file again")),
    BadInput("header-entry-is-a-string",
             lambda r: _anima_dit(r, "string_entry.safetensors", {"w": "F32"}),
             CheckpointError, ("string_entry.safetensors", "'w'", "not a table")),
    BadInput("header-metadata-is-a-list",
             lambda r: _anima_dit(r, "meta_list.safetensors", {"__metadata__": ["a", "b"], "w": _good_entry()},
                                  bytes(16)),
             CheckpointError, ("meta_list.safetensors", "__metadata__", "damaged")),
    BadInput("header-metadata-value-not-a-string",
             lambda r: _anima_dit(r, "meta_int.safetensors", {"__metadata__": {"steps": 4}, "w": _good_entry()},
                                  bytes(16)),
             CheckpointError, ("meta_int.safetensors", "'steps'")),
    BadInput("header-offsets-reversed",
             lambda r: _anima_dit(r, "reversed.safetensors", {"w": {"dtype": "F32", "shape": [4],
                                                                   "data_offsets": [16, 0]}}, bytes(16)),
             CheckpointError, ("reversed.safetensors", "data_offsets")),
    BadInput("header-shape-not-sizes",
             lambda r: _anima_dit(r, "shape.safetensors", {"w": {"dtype": "F32", "shape": ["4"],
                                                                "data_offsets": [0, 16]}}, bytes(16)),
             CheckpointError, ("shape.safetensors", "shape")),
    BadInput("safetensors-truncated-data",
             lambda r: _anima_dit(r, "cut.safetensors", {"w": _good_entry(64)}, bytes(100)),
             CheckpointError, ("cut.safetensors", "truncated", "fetch the file again")),
    BadInput("safetensors-is-an-html-page",
             lambda r: _anima_dit_path(r, _write(r / "models" / "diffusion_models" / "page.safetensors", HTML)),
             CheckpointError, ("page.safetensors", "web page", "download the file again")),
    # -- pickled checkpoints, through Wan VAE Loader (which reads the official .pth)
    BadInput("pth-is-an-html-page", lambda r: _wan_vae(r, _vae_file(r, "Wan2.1_VAE.pth", HTML)),
             CheckpointError, ("Wan2.1_VAE.pth", "web page", "download the file again")),
    BadInput("pth-malicious-zip-pickle", lambda r: _evil_pth(r, zipped=True),
             CheckpointError, ("evil.pth", "weights-only", "safetensors")),
    BadInput("pth-malicious-legacy-pickle", lambda r: _evil_pth(r, zipped=False),
             CheckpointError, ("evil.pth", "weights-only", "safetensors")),
    BadInput("pth-legacy-truncated", _truncated_legacy_pth,
             CheckpointError, ("cut.pth", "truncated or damaged", "fetch it again")),
    BadInput("pth-random-bytes", lambda r: _wan_vae(r, _vae_file(r, "noise.pth", os.urandom(300))),
             CheckpointError, ("noise.pth", "fetch it again")),
    # -- Load Anima Reference Context
    BadInput("context-header-too-small", lambda r: _context_file(r, "tiny.safetensors", raw=b"\x01\x02\x03"),
             CheckpointError, ("tiny.safetensors", "too short")),
    BadInput("context-steps-not-a-number", lambda r: _context_file(r, "steps.safetensors", {"steps": "four"}),
             CheckpointError, ("steps.safetensors", "'steps'", "save the context again")),
    BadInput("context-learning-rate-not-a-number",
             lambda r: _context_file(r, "lr.safetensors", {"learning_rate": "fast"}),
             CheckpointError, ("lr.safetensors", "'learning_rate'")),
    BadInput("context-image-sizes-not-json",
             lambda r: _context_file(r, "sizes.safetensors", {"image_sizes": "[[64, 64"}),
             CheckpointError, ("sizes.safetensors", "'image_sizes'", "not valid json")),
    BadInput("context-image-sizes-wrong-shape",
             lambda r: _context_file(r, "sizes2.safetensors", {"image_sizes": '{"h": 64}'}),
             CheckpointError, ("sizes2.safetensors", "'image_sizes'", "[height, width]")),
    BadInput("context-version-not-a-number", lambda r: _context_file(r, "ver.safetensors", {"version": "v2"}),
             CheckpointError, ("ver.safetensors", "'version'")),
    BadInput("context-newer-version", lambda r: _context_file(r, "new.safetensors", {"version": "9"}),
             CheckpointError, ("new.safetensors", "newer slipstream", "update the pack")),
    BadInput("context-not-a-context", lambda r: _context_file(r, "other.safetensors", {"format": "something"}),
             CheckpointError, ("other.safetensors", "not a slipstream anima reference context")),
    BadInput("context-non-finite-tokens",
             lambda r: _context_file(r, "nan.safetensors", tokens=torch.full((2, 4, 8), float("inf"))),
             (CheckpointError, NonFiniteError), ("nan.safetensors", "tokens", "infinite")),
    BadInput("context-integer-tokens",
             lambda r: _context_file(r, "int.safetensors", tokens=torch.zeros(2, 4, 8, dtype=torch.int32)),
             CheckpointError, ("int.safetensors", "floating-point")),
    # -- Load Reference Image
    BadInput("reference-image-truncated-png",
             lambda r: _reference_image(r, "cut.png", _png_bytes((64, 64))[:120]),
             InvalidReferenceImageFile, ("cut.png", "truncated or damaged")),
    BadInput("reference-image-is-html", lambda r: _reference_image(r, "page.png", HTML),
             InvalidReferenceImageFile, ("page.png", "not an image")),
    # -- MIA rig
    BadInput("mia-coordinates-overflow-float32",
             lambda r: _rig(_mesh([[0, 0, 0], [1e300, 0, 0], [0, 1, 0]], [[0, 1, 2]])),
             MeshError, ("trimesh input", "too large", "re-export")),
    BadInput("mia-coordinates-nan",
             lambda r: _rig(_mesh([[0, 0, 0], [np.nan, 0, 0], [0, 1, 0]], [[0, 1, 2]])),
             MeshError, ("trimesh input", "nan")),
    BadInput("mia-face-past-the-vertices",
             lambda r: _rig(_mesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 7]])),
             MeshError, ("trimesh input", "vertex 7", "3 vertices")),
    BadInput("mia-over-the-vertex-budget",
             lambda r: _rig(_mesh(np.random.default_rng(0).random((MAX_RIG_VERTICES + 1, 3)), [[0, 1, 2]])),
             MeshError, ("trimesh input", f"{MAX_RIG_VERTICES:,}", "decimate")),
    BadInput("mia-no-faces", lambda r: _rig(_mesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.zeros((0, 3)))),
             MeshError, ("no faces",)),
    BadInput("mia-not-a-mesh", lambda r: _rig("character.fbx"), MeshError, ("character.fbx", "not a supported")),
    BadInput("mia-load-mesh-outside-input", lambda r: _load_mesh("../../etc/passwd.stl"),
             MeshError, ("passwd.stl", "outside the input folder")),
    BadInput("mia-load-mesh-damaged", lambda r: _load_mesh(_write_input(r, "3d/broken.glb", HTML)),
             MeshError, ("broken.glb", "re-export")),
    BadInput("mia-flash-attn-missing", lambda r: _mia_load_with("flash_attn"),
             AttentionBackendUnavailable, ("flash",)),
    # -- integer or bool weights in a DiT
    BadInput("wan-dit-int64-weight", lambda r: _wan_dit_with(r, torch.int64),
             CheckpointError, ("odd_wan.safetensors", "blocks.0.norm3.weight", "int64", "fp16")),
    BadInput("wan-dit-bool-weight", lambda r: _wan_dit_with(r, torch.bool),
             CheckpointError, ("odd_wan.safetensors", "bool")),
    BadInput("anima-dit-bool-weight", lambda r: _anima_dit_with(r, torch.bool),
             CheckpointError, ("anima_tiny", "bool", "floating-point")),
    BadInput("anima-dit-int64-weight", lambda r: _anima_dit_with(r, torch.int64),
             CheckpointError, ("anima_tiny", "int64")),
    BadInput("anima-text-encoder-int64-weight", lambda r: _anima_text_encoder_with(r, torch.int64),
             CheckpointError, ("qwen3", "anima_tiny", "int64")),
    # -- Wan encoders and decoder
    BadInput("wan-i2v-encode-no-images", _i2v_no_images, WanInputError, ("start_image", "empty")),
    BadInput("wan-i2v-encode-not-an-image",
             lambda r: _wan_i2v_with(torch.zeros(64, 64, 3)), WanInputError, ("start_image", "(64, 64, 3)")),
    BadInput("wan-clip-vision-encode-no-images", _clip_no_images, WanInputError, ("image", "empty")),
    BadInput("wan-decode-zero-frames", _decode_no_frames, WanInputError, ("empty video latent", "at least one frame")),
    # -- Anima training settings, refused before any model work (the models are None here)
    BadInput("anima-num-tokens-zero", lambda r: _train(num_tokens=0), InvalidTrainingSetting, ("num_tokens",)),
    BadInput("anima-learning-rate-nan", lambda r: _train(learning_rate=float("nan")), InvalidTrainingSetting,
             ("learning_rate", "nan", "positive finite")),
    BadInput("anima-learning-rate-inf", lambda r: _train(learning_rate=float("inf")), InvalidTrainingSetting,
             ("learning_rate", "inf", "0.005")),
    BadInput("anima-learning-rate-zero", lambda r: _train(learning_rate=0.0), InvalidTrainingSetting,
             ("learning_rate",)),
    BadInput("anima-training-steps-zero", lambda r: _train(training_steps=0), InvalidTrainingSetting,
             ("training_steps",)),
    BadInput("anima-init-std-nan", lambda r: _train(init_std=float("nan")), InvalidTrainingSetting, ("init_std",)),
    BadInput("anima-model-from-int8-loader", _anima_model_from_int8_loader, IncompatibleModelArchitecture,
             ("process_latent_in", "load anima model")),
    BadInput("anima-save-non-finite-context", _save_non_finite_context, TokenOptimizationFailed,
             ("tokens", "nan or inf", "nothing was saved")),
    BadInput("anima-save-non-finite-loss-history", lambda r: _save_non_finite_context(r, history=float("inf")),
             TokenOptimizationFailed, ("loss_history", "nothing was saved")),
]


def _anima_dit_path(root: Path, name: str) -> None:
    from slipstream.nodes.anima_loaders import SlipstreamAnimaModelLoader

    SlipstreamAnimaModelLoader().load(name, "default")


def _write(path: Path, payload: bytes) -> str:
    """Write `payload` at `path` (folders made); returns the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path.name


def _write_input(root: Path, name: str, payload: bytes) -> str:
    _write(root / "input" / name, payload)
    return name


def _load_mesh(name: str) -> None:
    from slipstream.nodes.mia import SlipstreamLoadMesh

    SlipstreamLoadMesh().load(name)


def _mia_load_with(backend: str) -> None:
    from slipstream.kernels import attention
    from slipstream.nodes.mia import MIALoadModel

    if attention.is_installed("flash_attn"):
        pytest.skip("flash-attn is installed here")
    MIALoadModel().load("fp32", backend)


def _wan_i2v_with(image) -> None:
    from slipstream.nodes.wan_encoders import WanImageToVideoEncode

    WanImageToVideoEncode().encode(None, image, None, 64, 64, 5, 0.0, True, False)


@cases_param(CASES)
def test_bad_input_gets_our_error_naming_it(case: BadInput, tmp_path: Path, workdirs):
    assert_bad_input(case, tmp_path)


# -- what must keep working, and the outputs that must never be written ---------------------------

def test_legacy_non_zip_pth_loads_weights_only(workdirs):
    from slipstream.models.checkpoint import load_state_dict

    path = workdirs["models"] / "legacy.pth"
    torch.save({"state_dict": {"w": torch.arange(6.0).view(2, 3)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(str(path))["w"], torch.arange(6.0).view(2, 3))


def test_sixteen_bit_png_is_scaled_by_its_bit_depth(workdirs):
    from slipstream.nodes.anima_loaders import SlipstreamLoadReferenceImage

    grey = np.linspace(0, 65535, 24 * 32).reshape(24, 32).astype(np.uint16)
    Image.fromarray(grey).save(workdirs["input"] / "deep.png")
    with Image.open(workdirs["input"] / "deep.png") as img:
        assert img.mode.startswith("I")
    image, mask = SlipstreamLoadReferenceImage().load("deep.png")
    expected = torch.from_numpy(grey.astype(np.float32) / 65535.0)
    assert image.shape == (1, 24, 32, 3) and torch.allclose(image[0, :, :, 1], expected, atol=1e-6)
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0 and torch.all(mask == 1)


def test_uint8_reference_image_trains_like_its_float_copy(workdirs):
    from slipstream.nodes.anima import AnimaFastTrainReferenceContext
    from slipstream.nodes.anima_loaders import (
        SlipstreamAnimaModelLoader,
        SlipstreamAnimaTextEncoderLoader,
        SlipstreamAnimaVAELoader,
    )

    files = write_tiny_anima(workdirs["models"])
    model = SlipstreamAnimaModelLoader().load(files.dit, "default")[0]
    clip = SlipstreamAnimaTextEncoderLoader().load(files.text_encoder)[0]
    vae = SlipstreamAnimaVAELoader().load(files.vae)[0]
    pixels = torch.randint(0, 256, (1, 64, 64, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    as_bytes, _ = AnimaFastTrainReferenceContext().train(model, clip, vae, pixels, **TRAIN)
    as_floats, _ = AnimaFastTrainReferenceContext().train(model, clip, vae, pixels.float() / 255, **TRAIN)
    assert torch.equal(as_bytes.tokens, as_floats.tokens)


def test_rig_with_non_finite_result_publishes_nothing(workdirs, monkeypatch):
    from slipstream.models.mia import skeleton
    from slipstream.models.mia.rig import RigResult
    from slipstream.nodes import mia as mia_nodes

    mesh = make_humanoid(textured=False)
    joints = skeleton.subset(True)
    count = len(mesh.vertices)
    weights = np.zeros((count, len(joints)), dtype=np.float32)
    weights[:, 0] = 1.0
    vertices = np.asarray(mesh.vertices, dtype=np.float32).copy()
    vertices[5] = np.inf                 # what a float32 overflow in the rest-pose step gives
    heads = np.zeros((len(joints), 3), dtype=np.float32)
    result = RigResult(vertices, joints, heads, heads + 0.1, np.tile(np.eye(4), (len(joints), 1, 1)), weights)
    monkeypatch.setattr(mia_nodes, "rig_mesh", lambda *args, **kwargs: result)
    monkeypatch.setattr(mia_nodes, "make_networks_resident", lambda *args: None)   # no networks: rig_mesh is faked
    with pytest.raises(MeshError, match="non-finite"):
        mia_nodes.MIAAutoRig().rig(mesh, None)
    folder = workdirs["output"] / "3d"
    assert not folder.exists() or not any(folder.iterdir())


def test_far_from_humanoid_shapes_are_warned_about(caplog, monkeypatch):
    from slipstream.models.mia.plausibility import humanoid_doubt

    assert humanoid_doubt(make_humanoid(textured=False)) is None
    for shape in (CUBE, trimesh.creation.icosphere(), trimesh.creation.cylinder(0.2, 1.8)):
        doubt = humanoid_doubt(shape, "The trimesh input")
        assert doubt is not None and "does not look like a standing humanoid" in doubt

    from slipstream.nodes import mia as mia_nodes

    class Rigged(Exception):
        pass

    def stop(*args, **kwargs):
        raise Rigged

    monkeypatch.setattr(mia_nodes, "rig_mesh", stop)
    monkeypatch.setattr(mia_nodes, "make_networks_resident", lambda *args: None)   # no networks: rig_mesh is faked
    with caplog.at_level(logging.WARNING, logger="slipstream.mia"), pytest.raises(Rigged):
        mia_nodes.MIAAutoRig().rig(CUBE, None)       # warned before the rig starts
    assert "standing humanoid" in caplog.text


def test_normals_for_skin_weights_need_no_scipy_and_match_trimesh(caplog):
    from slipstream.models.mia.mesh import vertex_normals

    mesh = trimesh.creation.icosphere(subdivisions=2)
    mesh = _mesh(mesh.vertices * np.random.default_rng(2).uniform(0.7, 1.3, (len(mesh.vertices), 1)), mesh.faces)
    ours = vertex_normals(mesh.vertices, mesh.faces)
    with caplog.at_level(logging.WARNING):
        reference = trimesh.geometry.weighted_vertex_normals(len(mesh.vertices), mesh.faces, mesh.face_normals,
                                                             mesh.face_angles, use_loop=True)
    assert np.allclose(ours, reference, atol=1e-9)
