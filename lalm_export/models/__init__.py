"""PyTorch wrappers: the contract of the original usage guide (`src.model.*`)."""

from lalm_export.models.audio_encoder import (
    BaseAudioEncoder,
    HubertAudioEncoder,
    Wav2Vec2AudioEncoder,
    WhisperAudioEncoder,
)
from lalm_export.models.llm import LLMDecoder

ENCODER_CLASSES = {cls.family: cls for cls in (WhisperAudioEncoder, HubertAudioEncoder, Wav2Vec2AudioEncoder)}

__all__ = [
    "BaseAudioEncoder",
    "ENCODER_CLASSES",
    "HubertAudioEncoder",
    "LLMDecoder",
    "Wav2Vec2AudioEncoder",
    "WhisperAudioEncoder",
]
