"""Reference tokens in the cross-attention: the injection op, its strength, gating, stacking and patching."""

from __future__ import annotations

import math

import pytest
import torch
from slipstream.host.graph_values import ModelPatcher
from slipstream.models.anima.context_tokens import (
    Injection,
    InjectionGate,
    ReferenceAttnOp,
    ReferenceContext,
    attn_op_name,
    installed_tokens,
    reference_object_patches,
)
from slipstream.models.anima.dit import tiny_config
from slipstream.models.anima.errors import IncompatibleModelArchitecture
from slipstream.models.anima.model import AnimaModel
from slipstream.models.anima.tiny import tiny_dit
from slipstream.nodes.anima import AnimaFastTrainPatchModel

pytestmark = pytest.mark.usefixtures("single_thread")

CFG = tiny_config(model_channels=32, num_blocks=2, num_heads=2, context_dim=16, source_dim=16)


@pytest.fixture(scope="module")
def dit():
    return tiny_dit(seed=0, cfg=CFG, std=0.2)


def _patcher(dit) -> ModelPatcher:
    return ModelPatcher(AnimaModel(dit), torch.device("cpu"), torch.device("cpu"))


def _inputs(batch: int = 1):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(batch, 16, 1, 4, 4, generator=g), torch.full((batch,), 0.6),
            torch.randn(batch, 8, CFG.crossattn_emb_channels, generator=g))


def _context(num_tokens: int = 3, seed: int = 1) -> ReferenceContext:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(CFG.num_blocks, num_tokens, CFG.crossattn_emb_channels, generator=g)
    return ReferenceContext(tokens=tokens, steps=1, learning_rate=0.01, final_loss=0.0, reference_count=1)


def _run(patcher: ModelPatcher, options: dict | None = None, batch: int = 1) -> torch.Tensor:
    x, t, ctx = _inputs(batch)
    patcher.patch_model()
    try:
        return patcher.model.diffusion_model(x, t, ctx, transformer_options=options or {})
    finally:
        patcher.unpatch_model()


def test_patched_output_differs_at_scale_above_zero_and_equals_base_at_zero(dit):
    base = _patcher(dit)
    reference = _run(base)
    node = AnimaFastTrainPatchModel()
    (off,) = node.patch(base, _context(), 0.0)
    (on,) = node.patch(base, _context(), 1.0)
    assert torch.equal(_run(off), reference)
    assert not torch.allclose(_run(on), reference, atol=1e-4)
    assert torch.equal(_run(base), reference), "the input MODEL must be unchanged"
    assert not base.object_patches and set(on.object_patches) == {attn_op_name(i) for i in range(CFG.num_blocks)}
    assert all(cross.attn_op is not None and not isinstance(cross.attn_op, ReferenceAttnOp)
               for cross in (b.cross_attn for b in dit.blocks)), "unpatch_model must restore the original op"


def test_strength_is_a_logit_bias_scale_two_equals_each_token_twice(dit):
    """Scale s multiplies a token's attention weight by s: s = 2 is exactly every token duplicated."""
    ctx = _context(num_tokens=2)
    doubled = ReferenceContext(tokens=ctx.tokens.repeat_interleave(2, dim=1), steps=1, learning_rate=0.01,
                               final_loss=0.0, reference_count=1)
    node = AnimaFastTrainPatchModel()
    (scaled,) = node.patch(_patcher(dit), ctx, 2.0)
    (dup,) = node.patch(_patcher(dit), doubled, 1.0)
    (plain,) = node.patch(_patcher(dit), ctx, 1.0)
    assert torch.allclose(_run(scaled), _run(dup), atol=1e-5)
    assert not torch.allclose(_run(scaled), _run(plain), atol=1e-4)


def test_multiplying_the_tokens_does_not_change_their_keys(dit):
    """Why the scale is not 'multiply the tokens': k_norm makes a token's key scale-invariant."""
    cross = dit.blocks[0].cross_attn
    token = torch.randn(1, CFG.crossattn_emb_channels)
    heads, hd = cross.n_heads, cross.head_dim
    k1 = cross.k_norm(cross.k_proj(token).view(1, heads, hd))
    k3 = cross.k_norm(cross.k_proj(3 * token).view(1, heads, hd))
    assert torch.allclose(k1, k3, atol=1e-4)


def test_unit_scale_uses_the_models_own_attention_and_matches_the_bias_path(dit):
    cross = dit.blocks[1].cross_attn
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 5, cross.n_heads, cross.head_dim, generator=g) for _ in range(3))
    tokens = torch.randn(4, CFG.crossattn_emb_channels, generator=g)
    calls = []

    def original(q_, k_, v_, transformer_options=None, **extra):
        calls.append((k_.shape[1], extra))
        return torch.nn.functional.scaled_dot_product_attention(
            q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2)).transpose(1, 2).reshape(2, 5, -1)

    fast = ReferenceAttnOp(cross, (Injection(tokens),), original)
    exact = ReferenceAttnOp(cross, (Injection(tokens),), original, differentiable=True)
    out_fast = fast(q, k, v, transformer_options={}, preferred_attention="x")
    assert calls == [(5 + 4, {"preferred_attention": "x"})]       # handed on with the extra keyword intact
    assert torch.allclose(out_fast, exact(q, k, v, transformer_options={}), atol=1e-5)


def test_sigma_window_and_positive_only_gate_per_sample(dit):
    base = _patcher(dit)
    gate_window = InjectionGate(sigma_start=0.5, sigma_end=0.2)
    patches = reference_object_patches(base.get_model_object, _context().tokens, 1.0, gate_window)
    windowed = base.clone()
    for name, op in patches.items():
        windowed.add_object_patch(name, op)
    assert torch.equal(_run(windowed, {"sigmas": torch.tensor([0.6])}), _run(base, {"sigmas": torch.tensor([0.6])}))
    assert not torch.allclose(_run(windowed, {"sigmas": torch.tensor([0.3])}), _run(base), atol=1e-4)

    (positive,) = AnimaFastTrainPatchModel().patch(base, _context(), 1.5, positive_only=True)
    opts = {"cond_or_uncond": [0, 1]}
    out, ref = _run(positive, opts, batch=2), _run(base, opts, batch=2)
    assert not torch.allclose(out[0], ref[0], atol=1e-4)        # cond chunk gets the tokens
    assert torch.allclose(out[1], ref[1], atol=1e-5)            # uncond chunk does not
    uncond_only = {"cond_or_uncond": [1]}
    assert torch.equal(_run(positive, uncond_only), _run(base, uncond_only))


def test_percent_window_maps_through_the_models_sigmas(dit):
    (patched,) = AnimaFastTrainPatchModel().patch(_patcher(dit), _context(), 1.0, start_percent=0.25,
                                                  end_percent=0.75)
    gate = patched.object_patches[attn_op_name(0)].injections[0].gate
    shift = 3.0
    assert gate.sigma_start == pytest.approx(shift * 0.75 / (1 + (shift - 1) * 0.75))
    assert gate.sigma_end == pytest.approx(shift * 0.25 / (1 + (shift - 1) * 0.25))
    (full,) = AnimaFastTrainPatchModel().patch(_patcher(dit), _context(), 1.0)
    assert full.object_patches[attn_op_name(0)].injections[0].gate.sigma_start == math.inf


def test_a_second_context_stacks_instead_of_replacing_the_first(dit):
    node = AnimaFastTrainPatchModel()
    (one,) = node.patch(_patcher(dit), _context(seed=1), 1.0)
    (two,) = node.patch(one, _context(seed=2, num_tokens=5), 0.5)
    op = two.object_patches[attn_op_name(1)]
    assert [i.tokens.shape[0] for i in op.injections] == [3, 5] and [i.scale for i in op.injections] == [1.0, 0.5]
    assert op.original is one.object_patches[attn_op_name(1)].original
    assert not torch.allclose(_run(two), _run(one), atol=1e-4)


class FakeContainer:
    """ComfyUI's newest attention passes single-owner containers (peek/take)."""

    def __init__(self, t):
        self.tensor = t

    def peek(self):
        return self.tensor

    def take(self):
        t, self.tensor = self.tensor, None
        return t


def test_comfy_attention_containers_are_unwrapped_or_passed_through(dit):
    cross = dit.blocks[0].cross_attn
    q, k, v = (torch.randn(1, 3, cross.n_heads, cross.head_dim) for _ in range(3))
    seen = []

    def original(q_, k_, v_, transformer_options=None, **extra):
        seen.append(type(q_).__name__)
        q_, k_, v_ = (t.take() if isinstance(t, FakeContainer) else t for t in (q_, k_, v_))
        return torch.nn.functional.scaled_dot_product_attention(
            q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2)).transpose(1, 2).reshape(1, 3, -1)

    op = ReferenceAttnOp(cross, (Injection(torch.randn(2, CFG.crossattn_emb_channels), 1.0,
                                           InjectionGate(positive_only=True)),), original)
    op(*(FakeContainer(t) for t in (q, k, v)), transformer_options={"cond_or_uncond": [1]})
    op(*(FakeContainer(t) for t in (q, k, v)), transformer_options={"cond_or_uncond": [0]})
    assert seen == ["FakeContainer", "Tensor"]


def test_training_install_is_temporary_and_differentiable(dit):
    tokens = torch.zeros(CFG.num_blocks, 2, CFG.crossattn_emb_channels, requires_grad=True)
    before = [b.cross_attn.attn_op for b in dit.blocks]
    x, t, ctx = _inputs()
    with installed_tokens(dit, tokens):
        dit(x, t, ctx).square().mean().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert [b.cross_attn.attn_op for b in dit.blocks] == before


def test_incompatible_models_and_contexts_say_what_was_given(dit):
    not_anima = ModelPatcher(torch.nn.Module(), torch.device("cpu"), torch.device("cpu"))
    not_anima.model.diffusion_model = torch.nn.Linear(2, 2)
    with pytest.raises(IncompatibleModelArchitecture, match="Incompatible model architecture: .*Linear"):
        AnimaFastTrainPatchModel().patch(not_anima, _context(), 1.0)
    wrong = ReferenceContext(tokens=torch.zeros(5, 2, 16), steps=1, learning_rate=0.1, final_loss=0.0,
                             reference_count=1)
    with pytest.raises(IncompatibleModelArchitecture, match=r"\(5, 2, 16\).*2 blocks with 16-wide context"):
        AnimaFastTrainPatchModel().patch(_patcher(dit), wrong, 1.0)
