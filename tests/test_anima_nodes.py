"""The Anima nodes end to end on tiny random-weight files, in the standalone host."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from slipstream.host.graph_values import CLIP, VAE, ModelPatcher
from slipstream.models.anima.context_tokens import ReferenceContext
from slipstream.models.anima.errors import (
    IncompatibleModelArchitecture,
    InvalidReferenceImageShape,
    TokenOptimizationFailed,
)
from slipstream.models.anima.tiny import write_tiny_anima
from slipstream.nodes.anima import (
    AnimaFastTrainMaskedReferenceContext,
    AnimaFastTrainPatchModel,
    AnimaFastTrainReferenceContext,
    SlipstreamAnimaLoadReferenceContext,
    SlipstreamAnimaSaveReferenceContext,
)
from slipstream.nodes.anima_loaders import (
    SlipstreamAnimaModelLoader,
    SlipstreamAnimaTextEncoderLoader,
    SlipstreamAnimaVAELoader,
    SlipstreamLoadReferenceImage,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TRAIN = dict(training_prompt="a (girl:1.2) with long hair", seed=3, training_steps=4, learning_rate=0.02,
             training_image_size=64, num_tokens=4, init_std=0.02, training_dtype="fp32")


@pytest.fixture(scope="module", autouse=True)
def flush_denormals():
    """Random tiny weights drift into subnormal floats, which the CPU runs 10-100x slower; flush them here."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def anima(workdirs):
    files = write_tiny_anima(workdirs["models"])
    (model,) = SlipstreamAnimaModelLoader().load(files.dit, "default")
    (clip,) = SlipstreamAnimaTextEncoderLoader().load(files.text_encoder)
    (vae,) = SlipstreamAnimaVAELoader().load(files.vae)
    return model, clip, vae


def _image(h=80, w=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h, w, 3, generator=g)


def _denoise(model: ModelPatcher) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 1, 8, 8, generator=g)
    ctx = torch.randn(1, 512, 32, generator=g)
    model.patch_model()
    try:
        return model.model.apply_model(x, torch.tensor([0.7]), ctx)
    finally:
        model.unpatch_model()


def test_train_then_patch_end_to_end(anima):
    model, clip, vae = anima
    snapshot = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    ctx, info = AnimaFastTrainReferenceContext().train(model, clip, vae, _image(), reference_image_2=_image(64, 96, 1),
                                                       **TRAIN)
    assert isinstance(ctx, ReferenceContext)
    assert ctx.tokens.shape == (2, 4, 32) and ctx.reference_count == 2 and ctx.steps == 4
    assert ctx.learning_rate == 0.02 and np.isfinite(ctx.final_loss)
    assert ctx.image_sizes == ((64, 64), (48, 80))       # ~64² px each, sides multiples of 16
    for line in ("4 steps, learning rate 0.02", "token norm before", "token norm after", "loss first/last",
                 "references: 2"):
        assert line in info, info
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in snapshot.items())

    again, _ = AnimaFastTrainReferenceContext().train(model, clip, vae, _image(), reference_image_2=_image(64, 96, 1),
                                                      **TRAIN)
    assert torch.equal(again.tokens, ctx.tokens)

    base = _denoise(model)
    (off,) = AnimaFastTrainPatchModel().patch(model, ctx, 0.0)
    (on,) = AnimaFastTrainPatchModel().patch(model, ctx, 1.0)
    assert torch.equal(_denoise(off), base)
    assert not torch.allclose(_denoise(on), base, atol=1e-5)
    assert torch.equal(_denoise(model), base)


def test_works_inside_inference_mode_like_comfyui(workdirs):
    files = write_tiny_anima(workdirs["models"])
    with torch.inference_mode():                        # ComfyUI runs every node like this
        (model,) = SlipstreamAnimaModelLoader().load(files.dit, "default")
        (clip,) = SlipstreamAnimaTextEncoderLoader().load(files.text_encoder)
        (vae,) = SlipstreamAnimaVAELoader().load(files.vae)
        assert next(model.model.diffusion_model.parameters()).is_inference()
        model.model.diffusion_model.requires_grad_(True)     # ComfyUI's modules keep nn.Parameter's default
        ctx, _ = AnimaFastTrainReferenceContext().train(model, clip, vae, _image(), **TRAIN)
        (patched,) = AnimaFastTrainPatchModel().patch(model, ctx, 1.0)
    assert torch.isfinite(ctx.tokens).all() and patched.object_patches


def test_masked_trainer_full_mask_equals_unmasked_and_partial_mask_differs(anima):
    model, clip, vae = anima
    image = _image(64, 64)
    plain, _ = AnimaFastTrainReferenceContext().train(model, clip, vae, image, **TRAIN)
    full, _ = AnimaFastTrainMaskedReferenceContext().train(model, clip, vae, image, torch.ones(1, 64, 64), **TRAIN)
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1
    masked, info = AnimaFastTrainMaskedReferenceContext().train(model, clip, vae, image, left, **TRAIN)
    assert torch.allclose(full.tokens, plain.tokens, atol=1e-6)
    assert not torch.allclose(masked.tokens, plain.tokens, atol=1e-5)
    with pytest.raises(InvalidReferenceImageShape, match="empty"):
        AnimaFastTrainMaskedReferenceContext().train(model, clip, vae, image, torch.zeros(1, 64, 64), **TRAIN)
    with pytest.raises(InvalidReferenceImageShape, match=r"training_mask is 32×64 but its reference image is 64×64"):
        AnimaFastTrainMaskedReferenceContext().train(model, clip, vae, image, torch.ones(1, 64, 32), **TRAIN)


@pytest.mark.parametrize("bad, received", [
    (torch.rand(64, 64, 3), r"\(64, 64, 3\)"),
    (torch.rand(1, 64, 64, 2), r"\(1, 64, 64, 2\)"),
    (torch.rand(1, 4, 64, 3), r"\(1, 4, 64, 3\)"),
])
def test_invalid_reference_image_shape_says_received_and_expected(anima, bad, received):
    model, clip, vae = anima
    with pytest.raises(InvalidReferenceImageShape,
                       match=rf"Invalid reference image shape: reference_image has shape {received}; expected "
                             r"\[batch, height, width, channels\]"):
        AnimaFastTrainReferenceContext().train(model, clip, vae, bad, **TRAIN)


def test_incompatible_model_architecture_names_what_was_given(anima):
    model, clip, vae = anima
    other = ModelPatcher(torch.nn.Module(), torch.device("cpu"), torch.device("cpu"))
    other.model.diffusion_model = torch.nn.Conv2d(4, 4, 3)
    with pytest.raises(IncompatibleModelArchitecture, match="Incompatible model architecture: the MODEL is a Conv2d"):
        AnimaFastTrainReferenceContext().train(other, clip, vae, _image(), **TRAIN)

    plain_clip = CLIP(torch.nn.Linear(1, 1), lambda text: text, lambda tokens: (torch.zeros(1, 3, 32), None),
                      torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(IncompatibleModelArchitecture, match="CLIP input .* not Anima's text encoder"):
        AnimaFastTrainReferenceContext().train(model, plain_clip, vae, _image(), **TRAIN)

    sd_vae = VAE(torch.nn.Linear(1, 1), lambda px: torch.zeros(px.shape[0], 4, px.shape[1] // 8, px.shape[2] // 8),
                 lambda z: z, torch.device("cpu"), torch.device("cpu"), 4, 8)
    with pytest.raises(IncompatibleModelArchitecture, match=r"latent of shape \(1, 4, 1, 8, 8\).*16-channel"):
        AnimaFastTrainReferenceContext().train(model, clip, sd_vae, _image(), **TRAIN)


def test_token_optimization_failed_on_a_non_finite_loss(anima):
    model, clip, vae = anima
    image = _image()
    image[0, 10, 10, 0] = float("nan")
    with pytest.raises(TokenOptimizationFailed, match=r"step 1 of 4.*Lower the learning rate \(it is 0.02; try 0.002\)"):
        AnimaFastTrainReferenceContext().train(model, clip, vae, image, **TRAIN)


def test_save_and_load_a_context_round_trip(anima, workdirs):
    model, clip, vae = anima
    ctx, _ = AnimaFastTrainReferenceContext().train(model, clip, vae, _image(), **TRAIN)
    ui = SlipstreamAnimaSaveReferenceContext().save(ctx, "anima_context/hero")["ui"]
    saved = workdirs["output"] / "anima_context" / ui["files"][0]["filename"]
    assert saved.name == "hero_00001_.safetensors" and saved.stat().st_size > 0
    SlipstreamAnimaSaveReferenceContext().save(ctx, "anima_context/hero")
    assert (workdirs["output"] / "anima_context" / "hero_00002_.safetensors").exists()   # never overwrites
    (workdirs["input"] / "hero.safetensors").write_bytes(saved.read_bytes())
    assert "hero.safetensors" in SlipstreamAnimaLoadReferenceContext.INPUT_TYPES()["required"]["context_file"][0]
    loaded, info = SlipstreamAnimaLoadReferenceContext().load("hero.safetensors")
    assert torch.equal(loaded.tokens, ctx.tokens) and loaded.steps == 4 and loaded.reference_count == 1
    assert loaded.training_prompt == TRAIN["training_prompt"] and loaded.loss_history == pytest.approx(ctx.loss_history)
    assert "2 blocks × 4 tokens × 32" in info


def test_load_reference_image_gives_alpha_as_the_subject_mask(workdirs):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[5:15, 10:20, 3] = 255
    Image.fromarray(rgba, "RGBA").save(workdirs["input"] / "char.png")
    assert "char.png" in SlipstreamLoadReferenceImage.INPUT_TYPES()["required"]["image"][0]
    image, mask = SlipstreamLoadReferenceImage().load("char.png")
    assert image.shape == (1, 20, 30, 3) and mask.shape == (1, 20, 30)
    assert mask[0, 10, 15] == 1.0 and mask[0, 0, 0] == 0.0 and image[0, 0, 0, 0] == 1.0
    assert SlipstreamLoadReferenceImage.VALIDATE_INPUTS("missing.png") != True  # noqa: E712


def test_text_encoder_loader_gives_offload_clip_a_stable_key_and_serves_ram_copy(workdirs, monkeypatch):
    from slipstream.kernels import dram
    from slipstream.kernels.sysmem import RamInfo
    from slipstream.nodes import anima_loaders
    from slipstream.nodes.memory import OffloadClipToDram

    info = RamInfo(64 << 30, 32 << 30, 64 << 30, 32 << 30, None)
    previous = dram.set_default_cache(dram.DramCache(budget_bytes=1 << 30, headroom_bytes=0, ram_probe=lambda: info))
    try:
        files = write_tiny_anima(workdirs["models"])
        (clip,) = SlipstreamAnimaTextEncoderLoader().load(files.text_encoder)
        _, dram_id, _, _ = OffloadClipToDram().offload(clip.clone(), trigger="cond")
        assert dram_id.startswith("clip:") and ":anon:" not in dram_id and os.path.basename(files.text_encoder) in dram_id
        del clip                                           # ComfyUI dropped the loader's output
        monkeypatch.setattr(anima_loaders, "_load_text_encoder", lambda path: pytest.fail("read from disk again"))
        (again,) = SlipstreamAnimaTextEncoderLoader().load(files.text_encoder)
        assert dram.default_cache().lookup(dram_id) is again
        cond = again.encode_from_tokens_scheduled(again.tokenize("a girl"))
        assert torch.isfinite(cond[0][0]).all()
    finally:
        dram.set_default_cache(previous)
