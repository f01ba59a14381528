"""PyTorch wrappers: the contract of the original usage guide (`src.model.*`)."""

from lalm_export.models.audio_encoder import (
    BaseAudioEncoder,
    Data2VecAudioEncoder,
    HubertAudioEncoder,
    Wav2Vec2AudioEncoder,
    WavLMAudioEncoder,
    WhisperAudioEncoder,
    encoder_class,
)
from lalm_export.models.families import ENCODER_FAMILIES
from lalm_export.models.lalm import LALM, ProjectorConfig
from lalm_export.models.llm import LLMDecoder

ENCODER_CLASSES = {family: encoder_class(family) for family in ENCODER_FAMILIES}

__all__ = [
    "BaseAudioEncoder",
    "Data2VecAudioEncoder",
    "ENCODER_CLASSES",
    "HubertAudioEncoder",
    "LALM",
    "LLMDecoder",
    "ProjectorConfig",
    "Wav2Vec2AudioEncoder",
    "WavLMAudioEncoder",
    "WhisperAudioEncoder",
    "encoder_class",
]
