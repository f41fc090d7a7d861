"""Stand-ins for the core ComfyUI nodes the example workflows feed our nodes with, so the headless runner
(`python -m slipstream run` / `demo`) runs those workflows unchanged.

Only what the workflows need, with core's node id, input names and output: `LoadAudio` reads a WAV
file from the input folder into core's AUDIO ({"waveform": [1, channels, samples] float32 in -1..1,
"sample_rate": int}). Inside ComfyUI core's own node runs instead.
"""

from __future__ import annotations

import os
import wave

import torch

AUDIO_EXTS = (".wav", ".wave")


def _audio_files() -> list[str]:
    from ..host import input_dir

    root = input_dir()
    if not os.path.isdir(root):
        return []
    return sorted(f for f in os.listdir(root) if f.lower().endswith(AUDIO_EXTS))


def read_wav(path: str) -> dict:
    """A PCM WAV file as core AUDIO; other encodings are refused with what to do."""
    try:
        with wave.open(path, "rb") as f:
            channels, width, rate, count = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            data = f.readframes(count)
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{os.path.basename(path)} is not a PCM WAV file the headless runner can read ({exc}); "
                         "convert it to 16-bit PCM WAV, or run the workflow in ComfyUI (its Load Audio reads any "
                         "format).") from exc
    if width == 1:
        samples = (torch.frombuffer(bytearray(data), dtype=torch.uint8).float() - 128.0) / 128.0
    elif width == 2:
        samples = torch.frombuffer(bytearray(data), dtype=torch.int16).float() / 32768.0
    elif width == 3:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, 3).int()
        value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        samples = torch.where(value >= 1 << 23, value - (1 << 24), value).float() / float(1 << 23)
    else:
        samples = torch.frombuffer(bytearray(data), dtype=torch.int32).float() / float(1 << 31)
    waveform = samples.view(-1, channels).t().contiguous()[None]
    return {"waveform": waveform, "sample_rate": int(rate)}


class LoadAudio:
    """Core Load Audio, for WAV files (see the module docstring)."""

    DESCRIPTION = "Loads a WAV file from the input folder as AUDIO (headless stand-in for core Load Audio)."
    CATEGORY = "audio"
    FUNCTION = "load"
    RETURN_TYPES = ("AUDIO",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"audio": (_audio_files() or ["(no audio files)"],
                                       {"tooltip": "A WAV file in the input folder."})}}

    def load(self, audio):
        from ..host import input_dir

        return (read_wav(os.path.join(input_dir(), audio)),)


CORE_STAND_INS: dict[str, type] = {"LoadAudio": LoadAudio}
