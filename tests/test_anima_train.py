"""The token trainer on latents: it learns, it is reproducible, it never touches the base model."""

from __future__ import annotations

import pytest
import torch
from slipstream.models.anima.context_tokens import installed_tokens
from slipstream.models.anima.dit import AnimaDiT, tiny_config
from slipstream.models.anima.errors import TokenOptimizationFailed
from slipstream.models.anima.tiny import tiny_dit
from slipstream.models.anima.train import (
    TrainSettings,
    train_context_tokens,
    training_view,
    velocity_loss,
)
from slipstream.models.common.flow import shift_sigma

pytestmark = pytest.mark.usefixtures("single_thread")

CFG = tiny_config(model_channels=32, num_blocks=2, num_heads=2, context_dim=16, source_dim=16)
SETTINGS = TrainSettings(steps=20, learning_rate=0.05, num_tokens=8, dtype=torch.float32, seed=11)


@pytest.fixture(scope="module", autouse=True)
def flush_denormals():
    """Random tiny weights drift into subnormal floats, which the CPU runs 10-100x slower; flush them here."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def setup():
    dit = tiny_dit(seed=0, cfg=CFG, std=0.2)
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 1, 6, 10, generator=g)]
    context = torch.randn(1, 16, CFG.crossattn_emb_channels, generator=g)
    return dit, latents, context


def _fixed_draw_loss(dit, tokens, latents, context, draws: int = 6) -> float:
    """The training objective on fixed (sigma, noise) draws: comparable before and after training."""
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad(), installed_tokens(dit, tokens):
        for i in range(draws):
            x0 = latents[i % len(latents)]
            eps = torch.randn(x0.shape, generator=g)
            s = shift_sigma(torch.rand((), generator=g), 3.0).item()
            total += velocity_loss(dit((1 - s) * x0 + s * eps, torch.tensor([s]), context), eps - x0).item()
    return total / draws


def test_training_lowers_the_loss_and_is_reproducible(setup):
    dit, latents, context = setup
    steps_seen = []
    result = train_context_tokens(dit, latents, context, SETTINGS, "cpu",
                                  progress=lambda done, total, loss: steps_seen.append((done, total)))
    before = _fixed_draw_loss(dit, result.initial_tokens, latents, context)
    after = _fixed_draw_loss(dit, result.tokens, latents, context)
    assert after < 0.97 * before, (before, after)
    assert result.eval_after < 0.97 * result.eval_before       # the trainer's own fixed-draw score agrees
    assert steps_seen == [(i, SETTINGS.steps) for i in range(1, SETTINGS.steps + 1)]
    assert result.tokens.shape == (CFG.num_blocks, SETTINGS.num_tokens, CFG.crossattn_emb_channels)
    assert result.tokens.dtype == torch.float32 and not result.tokens.requires_grad

    again = train_context_tokens(dit, latents, context, SETTINGS, "cpu")
    assert torch.equal(again.tokens, result.tokens) and again.losses == result.losses
    other = train_context_tokens(dit, latents, context, TrainSettings(**{**SETTINGS.__dict__, "seed": 12,
                                                                         "steps": 2}), "cpu")
    assert not torch.equal(other.initial_tokens, result.initial_tokens)


def test_base_weights_are_bit_identical_after_training(setup):
    dit, latents, context = setup
    snapshot = {k: v.clone() for k, v in dit.state_dict().items()}
    ops = [b.cross_attn.attn_op for b in dit.blocks]
    train_context_tokens(dit, latents, context, TrainSettings(steps=3, learning_rate=0.1, dtype=torch.float32), "cpu")
    after = dit.state_dict()
    assert set(after) == set(snapshot)
    assert all(torch.equal(after[k], snapshot[k]) for k in snapshot)
    assert all(p.grad is None and not p.requires_grad for p in dit.parameters())
    assert [b.cross_attn.attn_op for b in dit.blocks] == ops


def test_base_parameters_that_require_grad_get_no_gradient(setup):
    _, latents, context = setup
    dit = tiny_dit(seed=0, cfg=CFG, std=0.2).requires_grad_(True)
    train_context_tokens(dit, latents, context, TrainSettings(steps=2, dtype=torch.float32), "cpu")
    assert all(p.grad is None and p.requires_grad for p in dit.parameters())


def test_inference_mode_weights_are_trained_on_a_private_copy(setup):
    """ComfyUI loads weights under inference mode; autograd refuses them, so the trainer copies."""
    _, latents, context = setup
    with torch.inference_mode():
        dit = AnimaDiT.from_state_dict(tiny_dit(seed=0, cfg=CFG, std=0.2).state_dict())
        inference_latents = [z.clone() for z in latents]
        inference_context = context.clone()
    view, copied = training_view(dit, torch.float32)
    assert copied and view is not dit and not any(p.is_inference() for p in view.parameters())
    result = train_context_tokens(dit, inference_latents, inference_context,
                                  TrainSettings(steps=2, learning_rate=0.01, dtype=torch.float32), "cpu")
    assert torch.isfinite(result.tokens).all()
    assert training_view(tiny_dit(cfg=CFG), torch.float32)[1] is False


def test_masked_loss_ignores_the_masked_out_error():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 16, 1, 4, 6, generator=g)
    weight = torch.zeros(1, 1, 1, 4, 6)
    weight[..., :, :3] = 1.0                                    # learn the left half only
    pred = torch.randn(1, 16, 1, 4, 6, generator=g, requires_grad=True)
    loss = velocity_loss(pred, target, weight)
    loss.backward()
    assert torch.count_nonzero(pred.grad[..., 3:]) == 0         # no gradient from the ignored region
    wild = target.clone()
    wild[..., 3:] += 100.0                                      # any error there changes nothing
    assert velocity_loss(pred, wild, weight).item() == pytest.approx(loss.item())
    assert velocity_loss(pred, target).item() != pytest.approx(loss.item())
    left = velocity_loss(pred[..., :3], target[..., :3])
    assert loss.item() == pytest.approx(left.item(), rel=1e-6)  # = the mean error over the kept region


def test_masked_training_differs_from_unmasked_and_full_mask_equals_none(setup):
    dit, latents, context = setup
    short = TrainSettings(steps=4, learning_rate=0.05, num_tokens=4, dtype=torch.float32)
    plain = train_context_tokens(dit, latents[:1], context, short, "cpu")
    full = train_context_tokens(dit, latents[:1], context, short, "cpu", weights=[torch.ones(1, 1, 1, 8, 8)])
    half = torch.zeros(1, 1, 1, 8, 8)
    half[..., :4] = 1
    masked = train_context_tokens(dit, latents[:1], context, short, "cpu", weights=[half])
    assert torch.allclose(full.tokens, plain.tokens, atol=1e-6)
    assert not torch.allclose(masked.tokens, plain.tokens, atol=1e-4)


def test_non_finite_loss_raises_token_optimization_failed_with_step_and_advice(setup):
    dit, latents, context = setup
    bad = latents[0].clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(TokenOptimizationFailed, match=r"Token optimization failed: .*step 2 of 5.*Lower the learning"):
        train_context_tokens(dit, [latents[0], bad], context, TrainSettings(steps=5, dtype=torch.float32), "cpu")


def test_diverging_tokens_raise_token_optimization_failed(setup):
    dit, latents, context = setup
    with pytest.raises(TokenOptimizationFailed, match="step 1 of 3.*learning rate"):
        train_context_tokens(dit, latents, context,
                             TrainSettings(steps=3, learning_rate=float("inf"), dtype=torch.float32), "cpu")


def test_interrupt_is_checked_every_step(setup):
    dit, latents, context = setup
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        train_context_tokens(dit, latents, context, TrainSettings(steps=10, dtype=torch.float32), "cpu",
                             check_interrupt=check)
    assert len(calls) == 3
    assert not any(type(b.cross_attn.attn_op).__name__ == "ReferenceAttnOp" for b in dit.blocks)


def test_sigma_follows_anima_shift():
    t = torch.linspace(0, 1, 5)
    assert torch.allclose(shift_sigma(t, 3.0), 3 * t / (1 + 2 * t))
    assert shift_sigma(torch.tensor(0.5), 1.0).item() == pytest.approx(0.5)
