"""VACE through the sampling pipeline: reference frames trimmed, chained inputs, block swap over the
VACE blocks (same video, prefetch order = execution order), CFG batching, and miswired inputs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from slipstream.models.wan import config as wan_config
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.pipeline import (
    RunStats,
    SamplerSettings,
    SwapSettings,
    WanImageEmbeds,
    WanModelHandle,
    WanTextEmbeds,
    build_host_blocks,
    sample_video,
    swap_units,
)
from slipstream.models.wan.vace import VaceInput, tiny_vace

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
TEXT_DIM = 32


def _handle(swap: SwapSettings | None = None, vace: bool = True) -> WanModelHandle:
    base = tiny_vace(num_layers=4, vace_blocks=2, text_dim=TEXT_DIM) if vace else \
        wan_config.tiny("t2v", num_layers=4, text_dim=TEXT_DIM)
    cfg = replace(base, text_len=16)
    dit = WanDiT.build_meta(cfg).to_empty(device="cpu").eval().requires_grad_(False)
    dit.load_state_dict(random_state_dict(cfg, seed=1))
    host = build_host_blocks(dit, swap) if swap else None
    return WanModelHandle(dit, cfg.name, CPU, swap=swap, host_blocks=host)


def _text() -> WanTextEmbeds:
    g = torch.Generator().manual_seed(0)
    return WanTextEmbeds((torch.randn(5, TEXT_DIM, generator=g),), torch.randn(3, TEXT_DIM, generator=g))


def _vace(refs=0, strength=1.0, seed=2, frames=9, size=32) -> VaceInput:
    g = torch.Generator().manual_seed(seed)
    t = (frames - 1) // 4 + 1 + refs
    return VaceInput(torch.randn(96, t, size // 8, size // 8, generator=g), strength, refs)


def _run(handle, image, **kw):
    settings = kw.pop("settings", SamplerSettings(steps=2, cfg=5.0, shift=5.0, seed=7))
    return sample_video(handle, _text(), image, settings, device=CPU, **kw)


def test_reference_frames_are_sampled_then_cut_off():
    handle = _handle()
    out = _run(handle, WanImageEmbeds(32, 32, 9, vace=(_vace(refs=1),)))
    assert out.shape == (1, 16, 3, 4, 4)
    plain = _run(handle, WanImageEmbeds(32, 32, 9))          # no input: the empty context, as ComfyUI
    assert plain.shape == (1, 16, 3, 4, 4) and torch.isfinite(plain).all()


def test_chained_inputs_change_the_video_and_strength_zero_removes_one():
    handle = _handle()
    one = _run(handle, WanImageEmbeds(32, 32, 9, vace=(_vace(),)))
    two = _run(handle, WanImageEmbeds(32, 32, 9, vace=(_vace(), _vace(seed=5))))
    muted = _run(handle, WanImageEmbeds(32, 32, 9, vace=(_vace(), _vace(seed=5, strength=0.0))))
    assert (one - two).abs().max() > 1e-3
    torch.testing.assert_close(muted, one, atol=1e-4, rtol=1e-4)


def test_batched_cfg_equals_two_passes_with_vace():
    handle = _handle()
    image = WanImageEmbeds(32, 32, 9, vace=(_vace(refs=1),))
    on = _run(handle, image, settings=SamplerSettings(steps=2, cfg=4.0, batched_cfg="on"))
    off = _run(handle, image, settings=SamplerSettings(steps=2, cfg=4.0, batched_cfg="off"))
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)


def test_block_swap_streams_the_vace_blocks_in_execution_order():
    image = WanImageEmbeds(32, 32, 9, vace=(_vace(refs=1), _vace(refs=1, seed=4)))
    plain = _run(_handle(), image)
    swap = SwapSettings(blocks_to_swap=2, prefetch_blocks=1)
    handle = _handle(swap=swap)
    units, swapped = swap_units(handle.dit, swap)
    names = [type(u).__name__ for u in units]
    assert names == ["WanBlock", "WanVaceBlock", "WanBlock", "WanBlock", "WanVaceBlock", "WanBlock"]
    assert sum(names[i] == "WanVaceBlock" for i in swapped) == 1      # 2 of 4 main blocks -> 1 of 2 VACE
    stats = RunStats()
    assert torch.equal(_run(handle, image, stats=stats), plain)
    assert stats.swap["misses"] == 0 and stats.swap["order_changes"] == 0
    assert stats.swap["loads"] >= 3 * stats.forwards            # 2 main + 1 VACE block per forward


def test_miswired_vace_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="not a VACE model: load a Wan VACE checkpoint"):
        _run(_handle(vace=False), WanImageEmbeds(32, 32, 9, vace=(_vace(),)))
    with pytest.raises(ValueError, match="same width, height, num_frames and number of reference images"):
        _run(_handle(), WanImageEmbeds(32, 32, 9, vace=(_vace(), _vace(refs=1))))


def test_context_windows_keep_the_reference_frames_in_every_window():
    from slipstream.models.wan.context import ContextOptions

    handle = _handle()
    image = WanImageEmbeds(32, 32, 33, vace=(_vace(refs=1, frames=33),))        # 9 latent frames + 1 reference
    seen = []
    handle.dit.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[2]))
    stats = RunStats()
    context = ContextOptions("uniform_standard", 17, 4, 8, False, "linear")      # 5-frame latent windows
    out = _run(handle, image, context=context, stats=stats)
    assert out.shape == (1, 16, 9, 4, 4)
    assert stats.windows_per_step[0] > 1 and set(seen) == {1 + 5}                # reference + window
    whole = _run(handle, image, context=ContextOptions("uniform_standard", 41, 4, 8, False, "linear"))
    torch.testing.assert_close(whole, _run(handle, image), atol=1e-5, rtol=1e-5)  # one window = no windows
