"""The Python API under `python -m runtime.infer`: `load(bundle)` gives an encoder runner,
a text generator or an audio-LLM runner over verified ONNX Runtime sessions."""

from runtime.runners import load
from runtime.runners.decoder import Completion, TextGenerator
from runtime.runners.encoder import EncodedAudio, EncoderRunner
from runtime.runners.lalm import LalmRunner, Transcription
from runtime.sessions import SessionOptions

__all__ = ["Completion", "EncodedAudio", "EncoderRunner", "LalmRunner", "SessionOptions", "TextGenerator", "Transcription", "load"]
