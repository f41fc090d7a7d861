"""Speech-model guidance in the Wan sampler: each family's official passes and formula, the audio each
pass and each context window gets, and the errors for audio a run cannot use."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: helpers beside us
from slipstream.models.wan.context import ContextOptions, context_windows
from slipstream.models.wan.denoiser import SamplingExtras, WanDenoiser
from slipstream.models.wan.dit import WanDiT, random_state_dict
from slipstream.models.wan.pipeline import RunStats, SamplerSettings, WanModelHandle, sample_video_full
from slipstream.models.wan.speech_guidance import guidance_passes, window_frames
from wan_speech_fixtures import CPU, tiny_i2v_embeds, tiny_i2v_handle, tiny_text, toy_audio

pytestmark = pytest.mark.usefixtures("single_thread")

# (positive prompt?, real audio?) of each official pass, in the order the official loops run them.
OFFICIAL = {
    ("multitalk", True, True): [(True, True), (False, True), (False, False)],     # cond, drop_text, uncond
    ("fantasytalking", True, True): [(True, True), (True, False), (False, False)],  # posi, noaudio, no_cond
    ("multitalk", True, False): [(True, True), (False, True)],
    ("fantasytalking", True, False): [(True, True), (False, True)],               # audio_cfg_scale None path
    ("multitalk", False, True): [(True, True), (True, False)],                    # text scale 1: drop_audio
    ("fantasytalking", False, True): [(True, True), (True, False)],
    ("multitalk", False, False): [(True, True)],
    ("fantasytalking", False, False): [(True, True)],
}
SCALES = [(5.0, 4.0), (5.0, 1.0), (1.0, 4.0), (1.0, 1.0)]


def _official(family, preds, cfg, acfg):
    """The official combinations, written out (float64)."""
    p = [t.double() for t in preds]
    if len(p) == 1:
        return p[0]
    if len(p) == 2:
        return p[1] + (cfg if not math.isclose(cfg, 1.0) else acfg) * (p[0] - p[1])
    cond, mid, uncond = p
    if family == "multitalk":      # uncond + text·(cond − drop_text) + audio·(drop_text − uncond)
        return uncond + cfg * (cond - mid) + acfg * (mid - uncond)
    return uncond + cfg * (mid - uncond) + acfg * (cond - mid)   # no_cond + cfg·(noaudio − no_cond) + a·(posi − noaudio)


@pytest.mark.parametrize("family", ["multitalk", "fantasytalking"])
@pytest.mark.parametrize("cfg,acfg", SCALES)
def test_guided_velocity_is_the_official_formula_over_the_official_passes(family, cfg, acfg):
    handle = tiny_i2v_handle(family)
    text, image = tiny_text(), tiny_i2v_embeds()
    audio = toy_audio(family, image.num_frames)
    seen = []
    hook = handle.dit.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[2].shape[1] == text.positive[0].shape[0],
                                               bool(kwargs["audio"].features.abs().sum() > 0))), with_kwargs=True)
    stats = RunStats()
    denoiser = WanDenoiser(handle, text, image, True, CPU, None, None, None, stats,
                           SamplingExtras(audio=audio, audio_cfg=acfg))
    x = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    v = denoiser(x, 700.0, 0, 10, cfg)
    hook.remove()
    expected_passes = OFFICIAL[(family, not math.isclose(cfg, 1.0), not math.isclose(acfg, 1.0))]
    assert seen == expected_passes and stats.forwards == len(expected_passes)
    assert [(p.text, p.audio) for p in guidance_passes(family, cfg, acfg)] == expected_passes

    t = torch.full((1,), 700.0)
    prompts = {True: text.positive[0][None], False: text.negative[None]}
    preds = [handle.dit(x, t, prompts[pos], image.clip, image.y[None], audio=audio if real else audio.null())
             for pos, real in expected_passes]
    reference = _official(family, preds, cfg, acfg)
    assert torch.allclose(v.double(), reference, rtol=1e-5, atol=1e-6)
    if len(preds) > 1:
        assert (preds[0] - preds[-1]).abs().max() > 1e-3, "the branches must differ for the test to mean anything"


def test_three_pass_steps_run_through_the_sampler_and_audio_changes_the_video():
    handle = tiny_i2v_handle("multitalk")
    text, image = tiny_text(), tiny_i2v_embeds()
    settings = SamplerSettings(steps=2, cfg=5.0, shift=5.0, seed=1)
    stats = RunStats()
    a = sample_video_full(handle, text, image, settings, device=CPU, stats=stats,
                          extras=SamplingExtras(audio=toy_audio("multitalk", 9), audio_cfg=4.0)).latent
    assert stats.forwards == 2 * 3 and not stats.batched_cfg
    b = sample_video_full(handle, text, image, settings, device=CPU,
                          extras=SamplingExtras(audio=toy_audio("multitalk", 9, seed=7), audio_cfg=4.0)).latent
    assert (a - b).abs().max() > 1e-4, "other speech, other video"


def test_context_windows_get_the_audio_of_their_own_frames():
    handle = tiny_i2v_handle("multitalk")
    image = tiny_i2v_embeds(frames=25)                       # 7 latent frames
    audio = toy_audio("multitalk", 25)
    context = ContextOptions("static_standard", frames=9, stride=4, overlap=4, freenoise=False)
    seen = []
    hook = handle.dit.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["audio"].start, kwargs["audio"].num_frames)), with_kwargs=True)
    sample_video_full(handle, tiny_text(), image, SamplerSettings(steps=1, cfg=1.0, seed=1), device=CPU,
                      context=context, extras=SamplingExtras(audio=audio, audio_cfg=1.0))
    hook.remove()
    windows = context_windows("static_standard", 0, 7, *context.latent())
    assert len(windows) >= 2
    assert seen == [(0 if w[0] == 0 else 4 * w[0], 1 + 4 * (len(w) - 1)) for w in windows]
    assert window_frames([2, 3, 4]) == (8, 9) and window_frames([0, 1]) == (0, 5)
    with pytest.raises(ValueError, match="consecutive frames"):
        window_frames([5, 6, 0])


def test_audio_without_a_speech_model_is_refused_with_what_to_connect():
    cfg = replace(tiny_i2v_handle().config, name="tiny-i2v")
    dit = WanDiT(cfg).eval()
    dit.load_state_dict(random_state_dict(cfg, seed=1))
    plain = WanModelHandle(dit, "plain-i2v", CPU)
    with pytest.raises(ValueError, match="no speech model attached.*Wan model loader"):
        sample_video_full(plain, tiny_text(), tiny_i2v_embeds(), SamplerSettings(steps=1, seed=1), device=CPU,
                          extras=SamplingExtras(audio=toy_audio("multitalk", 9)))


def test_audio_of_the_other_family_is_refused():
    with pytest.raises(ValueError, match="fantasytalking.*multitalk embeds node"):
        sample_video_full(tiny_i2v_handle("multitalk"), tiny_text(), tiny_i2v_embeds(), SamplerSettings(steps=1),
                          device=CPU, extras=SamplingExtras(audio=toy_audio("fantasytalking", 9)))


def test_audio_shorter_than_the_video_is_refused_and_longer_audio_is_cut_to_its_start():
    handle = tiny_i2v_handle("multitalk")
    settings = SamplerSettings(steps=1, cfg=1.0, seed=1)
    with pytest.raises(ValueError, match="cover 5 video frames but the video has 9.*at least 9"):
        sample_video_full(handle, tiny_text(), tiny_i2v_embeds(), settings, device=CPU,
                          extras=SamplingExtras(audio=toy_audio("multitalk", 5), audio_cfg=1.0))
    seen = []
    hook = handle.dit.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["audio"].start, kwargs["audio"].num_frames)), with_kwargs=True)
    long = toy_audio("multitalk", 40)
    cut = sample_video_full(handle, tiny_text(), tiny_i2v_embeds(), settings, device=CPU,
                            extras=SamplingExtras(audio=long, audio_cfg=1.0)).latent
    hook.remove()
    assert seen == [(0, 9)]
    exact = sample_video_full(handle, tiny_text(), tiny_i2v_embeds(), settings, device=CPU,
                              extras=SamplingExtras(audio=long.frames(0, 9), audio_cfg=1.0)).latent
    assert torch.equal(cut, exact)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_audio_cfg_is_refused(bad):
    with pytest.raises(ValueError, match="audio_cfg must be a finite number"):
        sample_video_full(tiny_i2v_handle(), tiny_text(), tiny_i2v_embeds(), SamplerSettings(steps=1), device=CPU,
                          extras=SamplingExtras(audio=toy_audio("multitalk", 9), audio_cfg=bad))


def test_looped_context_windows_with_audio_are_refused_before_sampling():
    with pytest.raises(ValueError, match="consecutive frames"):
        sample_video_full(tiny_i2v_handle(), tiny_text(), tiny_i2v_embeds(frames=25), SamplerSettings(steps=1),
                          device=CPU, context=ContextOptions("uniform_looped", frames=9, stride=4, overlap=4),
                          extras=SamplingExtras(audio=toy_audio("multitalk", 25)))


def test_easycache_takes_one_decision_per_step_for_all_three_speech_passes(built_step_caches):
    """The positive pass decides and the no-text and no-audio passes follow, as core's other conds."""
    from slipstream.models.wan.step_cache import CacheArgs

    handle = tiny_i2v_handle("multitalk")
    steps = 8
    stats = RunStats()
    sample_video_full(handle, tiny_text(), tiny_i2v_embeds(), SamplerSettings(steps=steps, cfg=5.0, shift=5.0, seed=1),
                      device=CPU, stats=stats,
                      extras=SamplingExtras(audio=toy_audio("multitalk", 9), audio_cfg=4.0,
                                            cache_args=CacheArgs("easycache", 1.0, start_step=1)))
    (cache,) = built_step_caches
    assert len(cache.step_decisions) == steps
    skipped = sum(cache.step_decisions.values())
    assert skipped > 0
    assert cache.report.skipped == {"cond": skipped, "uncond": 2 * skipped}   # passes 2 and 3: negative text
    assert stats.forwards == 3 * (steps - skipped)
