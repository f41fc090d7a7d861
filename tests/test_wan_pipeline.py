"""The Wan sampling pipeline on a tiny random DiT: seeds, CFG batching, block swap, context windows,
FETA, interrupts, vid2vid and input checks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from slipstream.models.wan import config as wan_config
from slipstream.models.wan.context import ContextOptions
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.feta import FetaArgs
from slipstream.models.wan.pipeline import (
    RunStats,
    SamplerSettings,
    SwapSettings,
    WanImageEmbeds,
    WanModelHandle,
    WanTextEmbeds,
    build_host_blocks,
    round_video_size,
    sample_video,
)

pytestmark = pytest.mark.usefixtures("single_thread")


CPU = torch.device("cpu")
TEXT_DIM, CLIP_DIM = 32, 48


def _handle(model_type="t2v", layers=3, swap: SwapSettings | None = None) -> WanModelHandle:
    # A 16-token text context (instead of 512) keeps each forward at a few milliseconds.
    cfg = replace(wan_config.tiny(model_type, num_layers=layers, text_dim=TEXT_DIM, clip_dim=CLIP_DIM), text_len=16)
    dit = WanDiT(cfg).eval().requires_grad_(False)
    dit.load_state_dict(random_state_dict(cfg, seed=1))
    host = build_host_blocks(dit, swap) if swap else None
    return WanModelHandle(dit, cfg.name, CPU, swap=swap, host_blocks=host)


def _text(prompts=1, seed=0) -> WanTextEmbeds:
    g = torch.Generator().manual_seed(seed)
    return WanTextEmbeds(tuple(torch.randn(5 + i, TEXT_DIM, generator=g) for i in range(prompts)),
                         torch.randn(3, TEXT_DIM, generator=g))


def _t2v(frames=9, size=32) -> WanImageEmbeds:
    return WanImageEmbeds(size, size, frames)


def _i2v(frames=9, size=32) -> WanImageEmbeds:
    g = torch.Generator().manual_seed(3)
    t = (frames - 1) // 4 + 1
    mask = torch.zeros(4, t, size // 8, size // 8)
    mask[:, 0] = 1
    y = torch.cat([mask, torch.randn(16, t, size // 8, size // 8, generator=g)])
    return WanImageEmbeds(size, size, frames, y=y, clip=torch.randn(1, 257, CLIP_DIM, generator=g))


def _run(handle, image=None, **kw):
    settings = kw.pop("settings", SamplerSettings(steps=3, cfg=5.0, shift=5.0, seed=7))
    return sample_video(handle, kw.pop("text", _text()), image or _t2v(), settings, device=CPU, **kw)


def test_same_seed_same_video_and_shapes():
    handle = _handle()
    a, b = _run(handle), _run(handle)
    assert a.shape == (1, 16, 3, 4, 4) and a.dtype == torch.float32
    assert torch.equal(a, b)
    other = _run(handle, settings=SamplerSettings(steps=3, cfg=5.0, seed=8))
    assert not torch.allclose(a, other)


@pytest.mark.parametrize("scheduler", ["unipc", "dpm++", "euler"])
def test_every_scheduler_runs(scheduler):
    out = _run(_handle(), settings=SamplerSettings(steps=2, scheduler=scheduler))
    assert torch.isfinite(out).all()


def test_batched_cfg_equals_two_passes():
    handle = _handle()
    stats_on, stats_off = RunStats(), RunStats()
    on = _run(handle, settings=SamplerSettings(steps=3, cfg=4.0, batched_cfg="on"), stats=stats_on)
    off = _run(handle, settings=SamplerSettings(steps=3, cfg=4.0, batched_cfg="off"), stats=stats_off)
    assert stats_on.forwards == 3 and stats_off.forwards == 6
    assert torch.allclose(on, off, atol=1e-5)
    one = RunStats()
    _run(handle, settings=SamplerSettings(steps=3, cfg=1.0), stats=one)
    assert one.forwards == 3 and not one.batched_cfg, "cfg 1 skips the negative pass"


def test_block_swap_gives_the_same_video():
    plain = _run(_handle())
    swap = SwapSettings(blocks_to_swap=2, offload_txt_emb=True, prefetch_blocks=1)
    handle = _handle(swap=swap)
    stats = RunStats()
    swapped = _run(handle, stats=stats)
    assert torch.equal(plain, swapped)
    assert stats.swap["loads"] >= 3 * 3 and stats.swap["misses"] == 0
    i2v = _handle("i2v", swap=SwapSettings(blocks_to_swap=3, offload_img_emb=True, offload_txt_emb=True))
    assert torch.equal(_run(_handle("i2v"), _i2v()), _run(i2v, _i2v()))


def test_interrupt_stops_within_a_block_and_leaves_the_model_usable():
    handle = _handle(swap=SwapSettings(blocks_to_swap=2))
    reference = _run(handle)
    calls = {"n": 0}

    class Stop(Exception):
        pass

    def check():
        calls["n"] += 1
        if calls["n"] == 6:   # step 0: 1 step check + 3 blocks; step 1: 1 + the first block
            raise Stop

    with pytest.raises(Stop):
        _run(handle, check_interrupt=check)
    assert calls["n"] == 6
    assert torch.equal(_run(handle), reference)


def test_context_window_covering_everything_equals_plain_sampling():
    handle = _handle()
    plain = _run(handle)
    for schedule in ("uniform_standard", "uniform_looped", "static_standard"):
        options = ContextOptions(schedule=schedule, frames=81, stride=4, overlap=16, freenoise=True)
        assert torch.equal(_run(handle, context=options), plain)


def test_context_windows_split_long_videos():
    handle = _handle()
    stats = RunStats()
    options = ContextOptions(schedule="static_standard", frames=13, stride=4, overlap=8, freenoise=True)
    out = _run(handle, _t2v(frames=25), context=options, stats=stats)
    assert out.shape == (1, 16, 7, 4, 4) and torch.isfinite(out).all()
    assert stats.windows_per_step == [3, 3, 3]      # windows (0-3), (2-5), (3-6) of 7 latent frames
    looped = _run(handle, _t2v(frames=25), context=ContextOptions("uniform_looped", 13, 4, 8, fuse_method="pyramid"),
                  text=_text(prompts=2))
    assert torch.isfinite(looped).all()


def test_feta_weight_zero_is_identity():
    handle = _handle()
    plain = _run(handle)
    assert torch.equal(_run(handle, feta=FetaArgs(weight=0.0)), plain)
    assert torch.equal(_run(handle, feta=FetaArgs(weight=4.0, start_percent=0.9, end_percent=1.0)), plain)
    assert not torch.equal(_run(handle, feta=FetaArgs(weight=4.0)), plain)


def test_image_to_video_and_vid2vid():
    handle = _handle("i2v")
    out = _run(handle, _i2v())
    assert out.shape == (1, 16, 3, 4, 4) and torch.isfinite(out).all()
    t2v = _handle()
    start = torch.randn(2, 16, 3, 4, 4)
    full = SamplerSettings(steps=2, scheduler="euler", seed=1)
    assert torch.equal(_run(t2v, samples=start[:1], settings=full), _run(t2v, settings=full)), \
        "at denoise 1 (sigma 1) the start latent is fully replaced by noise"
    settings = SamplerSettings(steps=2, denoise=0.5, seed=1)
    refined = _run(t2v, samples=start, settings=settings)
    assert refined.shape == (2, 16, 3, 4, 4)
    assert not torch.allclose(refined, _run(t2v, samples=start + 1.0, settings=settings)), "depends on the start"


def test_clear_errors_for_miswired_inputs():
    with pytest.raises(ValueError, match="image-to-video model"):
        _run(_handle("i2v"))
    with pytest.raises(ValueError, match="text-to-video model"):
        _run(_handle(), _i2v())
    with pytest.raises(ValueError, match="expects 32"):
        _run(_handle(), text=WanTextEmbeds((torch.zeros(4, 64),)))
    with pytest.raises(ValueError, match="does not match"):
        _run(_handle(), samples=torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="needs a latent"):
        _run(_handle(), settings=SamplerSettings(denoise=0.5))


def test_round_video_size():
    assert round_video_size(832, 480, 81) == (832, 480, 81, None)
    w, h, f, note = round_video_size(830, 470, 80)
    assert (w, h, f) == (832, 464, 81) and "832x464" in note and "81" in note
    assert round_video_size(5, 5, 0)[:3] == (16, 16, 1)
