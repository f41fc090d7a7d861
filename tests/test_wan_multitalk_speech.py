"""Speech -> MultiTalk conditioning: speakers on the timeline (para / add), windows, the audio to mux,
silent audio, the embeds node's placements and its errors.

The assembly is tested with a stand-in feature function whose rows say which samples they came
from; the real speech encoder (models/audio) is exercised where that package is present."""

from __future__ import annotations

import importlib.util
import math
import types

import pytest
import torch
from slipstream.models.wan import multitalk_speech as speech
from slipstream.models.wan.multitalk_speech import multitalk_speech, place_speakers
from slipstream.nodes.wan_multitalk import WanMultiTalkEmbeds, speaker_regions

RATE = 16000
HAS_AUDIO = importlib.util.find_spec("slipstream.models.audio") is not None


def frame_energy(encoder, wave, num_frames, fps, progress=None):
    """Stand-in features [num_frames, 2, 3]: each row holds the mean |sample| of its frame's span."""
    per = RATE / fps
    padded = torch.nn.functional.pad(wave, (0, max(0, math.ceil(num_frames * per) - wave.shape[0])))
    rows = torch.stack([padded[int(i * per):int((i + 1) * per)].abs().mean() for i in range(num_frames)])
    if progress:
        progress(1, 1)
    return rows[:, None, None].expand(num_frames, 2, 3).clone()


@pytest.fixture
def plain_api(monkeypatch):
    """prepare_waveform without resampling or levelling (inputs are mono 16 kHz here)."""
    def prepare_waveform(audio, *, sample_rate=RATE, loudness_lufs=None):
        assert audio["sample_rate"] == RATE
        return audio["waveform"][0].float().mean(0)
    api = types.SimpleNamespace(prepare_waveform=prepare_waveform, multitalk_features=frame_energy)
    monkeypatch.setattr(speech, "_audio_api", lambda: api)
    return api


def clip(seconds: float, level: float = 0.5, channels: int = 1) -> dict:
    return {"waveform": torch.full((1, channels, int(seconds * RATE)), level), "sample_rate": RATE}


def test_para_and_add_place_the_speakers_as_the_official_audio_type():
    a, b = torch.ones(3), 2 * torch.ones(5)
    pa, pb = place_speakers(a, b, "para")
    assert pa.tolist() == [1, 1, 1, 0, 0] and pb.tolist() == [2] * 5
    aa, ab = place_speakers(a, b, "add")
    assert aa.tolist() == [1, 1, 1] + [0] * 5 and ab.tolist() == [0] * 3 + [2] * 5
    with pytest.raises(ValueError, match="para"):
        place_speakers(a, b, "both")


def test_one_speaker_gives_windows_and_the_own_clip_cut_to_the_video(plain_api):
    cond, mux = multitalk_speech(None, clip(2.0, channels=2), num_frames=9, frame_rate=25)
    assert cond.features.shape == (1, 9, 5, 2, 3) and cond.regions is None and cond.audio_scale == 1.0
    assert mux["sample_rate"] == RATE and mux["waveform"].shape == (1, 2, math.ceil(9 / 25 * RATE))


def test_add_puts_speaker_two_after_speaker_one_in_features_and_mux(plain_api):
    regions = speaker_regions("left / right")
    cond, mux = multitalk_speech(None, clip(0.2, 0.5), clip(0.2, 0.25), num_frames=13, frame_rate=25,
                                 audio_type="add", regions=regions)
    centre = cond.features[:, :, 2, 0, 0]                        # [speaker, frame] energy of the frame itself
    assert centre[0, :5].min() > 0.4 and centre[0, 5:].max() == 0          # speaker 1 talks first (0.2 s = 5 frames)
    assert centre[1, :5].max() == 0 and centre[1, 5:10].min() > 0.2
    assert torch.equal(cond.regions, regions)
    wave = mux["waveform"][0, 0]
    assert wave[:3200].eq(0.5).all() and wave[3200:6400].eq(0.25).all()      # mixed at 16 kHz, in sequence


def test_the_last_frames_windows_see_the_audio_past_the_video(plain_api):
    audio = {"waveform": torch.cat([torch.zeros(1, 1, 5760), torch.ones(1, 1, 3200)], dim=2), "sample_rate": RATE}
    cond, _ = multitalk_speech(None, audio, num_frames=9, frame_rate=25)   # video = 5760 samples, then speech
    window = cond.features[0, 8, :, 0, 0]
    assert window[:3].max() == 0 and window[3:].min() > 0.9               # frames 9 and 10 are heard


def test_silent_audio_is_allowed_and_noted(plain_api, caplog):
    with caplog.at_level("INFO", logger="slipstream.wan"):
        cond, _ = multitalk_speech(None, clip(1.0, 0.0), num_frames=5)
    assert not cond.features.any() and "silent" in caplog.text


def test_bad_settings_are_explained(plain_api):
    with pytest.raises(ValueError, match="4k \\+ 1"):
        multitalk_speech(None, clip(1.0), num_frames=8)
    with pytest.raises(ValueError, match="two speakers need their places"):
        multitalk_speech(None, clip(1.0), clip(1.0), num_frames=5)


def test_node_placements_and_refusals(plain_api):
    node = WanMultiTalkEmbeds()
    args = dict(num_frames=9, frame_rate=25.0, audio_scale=0.7, normalize_loudness=False, multi_audio_type="para")
    with pytest.raises(ValueError, match="needs mask_1 and mask_2"):
        node.encode(None, clip(1.0), placement="masks", audio_2=clip(1.0), **args)
    with pytest.raises(ValueError, match="needs start_image"):
        node.encode(None, clip(1.0), placement="bounding boxes", audio_2=clip(1.0), bbox_1="0,0,2,2", **args)
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, :, :8], masks[1, :, :, 8:] = 1, 1
    cond, mux = node.encode(None, clip(1.0), placement="masks", audio_2=clip(1.0), mask_1=masks[0], mask_2=masks[1],
                            **args)
    assert cond.speakers == 2 and cond.audio_scale == 0.7 and cond.regions[0, :, :8].all()
    image = torch.zeros(1, 40, 60, 3)
    boxes = node.encode(None, clip(1.0), placement="bounding boxes", audio_2=clip(1.0), bbox_1="0,0,30,40",
                        bbox_2="30, 0, 60, 40", start_image=image, **args)[0]
    assert boxes.regions.shape == (3, 40, 60) and boxes.regions[1, :, 30:].all()
    single = node.encode(None, clip(1.0), placement="masks", **args)[0]            # one speaker: no placement
    assert single.speakers == 1


@pytest.mark.skipif(not HAS_AUDIO, reason="models/audio (the speech encoder) is not in this tree")
def test_speech_encoder_to_embeds_node_to_the_dit(tmp_path):
    """The pieces fit: a tiny wav2vec2 through the node, into a tiny DiT with a tiny MultiTalk file
    sized for that encoder's features (2 layers of 128)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from multitalk_fixtures import tiny_multitalk_state_dict
    from slipstream.models.wan.config import tiny
    from slipstream.models.wan.dit import WanDiT, random_state_dict
    from slipstream.models.wan.multitalk import MultiTalkAdapter
    from speech_fixtures import TINY_BASE, tiny_speech_encoder

    encoder = tiny_speech_encoder(tmp_path)
    g = torch.Generator().manual_seed(0)
    voice = {"waveform": 0.1 * torch.randn(1, 1, 22050, generator=g), "sample_rate": 22050}
    cond, mux = WanMultiTalkEmbeds().encode(encoder, voice, num_frames=9, frame_rate=25.0, audio_scale=1.0,
                                            normalize_loudness=True, multi_audio_type="add", placement="left / right",
                                            audio_2=voice)
    assert cond.features.shape == (2, 9, 5, TINY_BASE.layers, TINY_BASE.hidden) and torch.isfinite(cond.features).all()
    assert mux["sample_rate"] == RATE
    cfg = tiny("i2v", text_dim=64, clip_dim=96)
    dit = WanDiT.from_state_dict(random_state_dict(cfg, seed=1))
    sd = tiny_multitalk_state_dict(cfg, layers=TINY_BASE.layers, channels=TINY_BASE.hidden)
    dit.attach_audio(MultiTalkAdapter.from_state_dict(sd, dit))
    inputs = (torch.randn(1, 16, 3, 8, 12, generator=g), torch.tensor([700.0]), torch.randn(1, 5, 64, generator=g),
              torch.randn(1, 257, 96, generator=g), torch.randn(1, 20, 3, 8, 12, generator=g))
    speech, silent = dit(*inputs, audio=cond), dit(*inputs, audio=cond.null())
    assert torch.isfinite(speech).all() and (speech - silent).abs().max() > 1e-3
