"""The speech encoder loader: a wav2vec2 file from models/audio_encoders, for the talking-head Wan nodes
(MultiTalk / InfiniteTalk, FantasyTalking embeds), which turn AUDIO into speech features with it."""

from __future__ import annotations

import torch

from ..host import compute_device, list_models, model_path, notice, offload_device, register_model_folder
from ..host.paths import MODEL_EXTENSIONS
from ..kernels.precision import resolve_dtype
from ..models.audio import load_speech_encoder
from .wan import LOAD_DEVICES, PRECISIONS

CATEGORY = "Slipstream/Audio"
FOLDER = "audio_encoders"
NORMALIZE_CHOICES = ("auto", "on", "off")
OFFLOAD_FIRST = (LOAD_DEVICES[1], LOAD_DEVICES[0])

# ComfyUI has this folder since 0.3.5x; registering keeps our extensions on it and gives the standalone
# runner the same models/audio_encoders folder.
register_model_folder(FOLDER, FOLDER, MODEL_EXTENSIONS)


class SlipstreamSpeechEncoderLoader:
    DESCRIPTION = ("Loads a wav2vec2 speech encoder from models/audio_encoders: chinese-wav2vec2-base for MultiTalk "
                   "and InfiniteTalk, wav2vec2-base-960h for FantasyTalking (Hugging Face model.safetensors or "
                   "pytorch_model.bin, ComfyUI's repackaged wav2vec2 files too). It waits in RAM and runs on the GPU "
                   "only while the embeds nodes encode speech.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("SLIPSTREAM_SPEECH_ENCODER",)
    RETURN_NAMES = ("speech_encoder",)
    OUTPUT_TOOLTIPS = ("The speech encoder, for the MultiTalk / InfiniteTalk and FantasyTalking embeds nodes.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": (list_models(FOLDER) or ["(no speech encoders found)"],
                           {"tooltip": "wav2vec2 file from models/audio_encoders, e.g. chinese-wav2vec2-base "
                                       "(MultiTalk / InfiniteTalk) or wav2vec2-base-960h (FantasyTalking); a "
                                       "downloaded model.safetensors or pytorch_model.bin can be renamed after "
                                       "its model."}),
            "precision": (list(PRECISIONS), {"default": "fp32",
                                             "tooltip": "Compute precision (official: fp32). The model is small "
                                                        "(95 M parameters), so fp32 costs little."}),
            "load_device": (list(OFFLOAD_FIRST), {"default": "offload_device",
                                                  "tooltip": "Where it waits between uses (RAM keeps VRAM free "
                                                             "for the video model); it encodes on the GPU either "
                                                             "way."}),
            "normalize_input": (list(NORMALIZE_CHOICES), {
                "default": "auto",
                "tooltip": "Normalise the waveform (zero mean, unit variance) before encoding, as the model's own "
                           "feature extractor does. auto: off for chinese-wav2vec2-base (its name holds 'chinese'), "
                           "on for wav2vec2-base-960h and other models."}),
        }}

    def load(self, model_name, precision, load_device, normalize_input="auto") -> tuple:
        if normalize_input not in NORMALIZE_CHOICES:
            raise ValueError(f"normalize_input must be one of {', '.join(NORMALIZE_CHOICES)}, got {normalize_input!r}.")
        path = model_path(FOLDER, model_name)
        main = compute_device()
        resident = main if load_device == "main_device" else offload_device()
        normalize = None if normalize_input == "auto" else normalize_input == "on"
        encoder = load_speech_encoder(path, device=resident, dtype=resolve_dtype(precision, main), normalize=normalize)
        encoder.compute_device = main
        encoder.offload = torch.device(resident) != torch.device(main)
        if normalize is None and encoder.normalization_reason.startswith("unknown"):
            notice("Speech Encoder", f"{model_name}: input normalisation on ({encoder.normalization_reason}); set "
                                     "normalize_input to 'off' if this is a chinese-wav2vec2-base file.")
        return (encoder,)
