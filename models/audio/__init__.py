"""Speech encoding for the talking-head Wan families: wav2vec2 and the features MultiTalk / InfiniteTalk
and FantasyTalking condition on, from ComfyUI AUDIO."""

from .encoder import SpeechEncoder, load_speech_encoder, normalization_for
from .features import fantasytalking_features, multitalk_features
from .loudness import integrated_loudness, normalize_loudness
from .wav2vec2 import Wav2Vec2, Wav2Vec2Config
from .waveform import AudioInputError, normalize_for_encoder, prepare_waveform, resample

__all__ = [
    "AudioInputError", "SpeechEncoder", "Wav2Vec2", "Wav2Vec2Config", "fantasytalking_features",
    "integrated_loudness", "load_speech_encoder", "multitalk_features", "normalization_for",
    "normalize_for_encoder", "normalize_loudness", "prepare_waveform", "resample",
]
