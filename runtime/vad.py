"""Where speech is in a recording, one value per 32 ms frame (512 samples at 16 kHz), read
block by block so that memory does not grow with the recording:

- `SileroVad`: Silero VAD v6 (MIT; `assets/silero_vad_16k_sequence.onnx`, the sequence export
  of the `silero-vad` 6.2.3 wheel, which runs a block of frames per ONNX Runtime call with the
  LSTM state carried between blocks): a speech probability per frame.
- `EnergyVad`: a frame's RMS level against the recording's noise floor; for sounds a speech
  detector does not hear as speech (the DTMF demo's key tones).
- `fixed`: no detector; every frame counts (windows cut at fixed places).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import BundleError

FRAME = 512  # samples per frame at 16 kHz: 32 ms
CONTEXT = 64  # samples of the previous frame the Silero model sees before each frame
SILERO_PATH = Path(__file__).parent / "assets" / "silero_vad_16k_sequence.onnx"
SILERO_SHA256 = "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85"
SPLITTERS = ("vad", "energy", "fixed")


class SileroVad:
    """Speech probabilities from Silero VAD on ONNX Runtime (CPU, one thread: it is small)."""

    def __init__(self) -> None:
        self.session = _silero_session()

    def probabilities(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """One probability per whole frame of the 16 kHz samples that `blocks` carry in order
        (the last partial frame zero-padded), block by block."""
        state = [np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32)]
        context = np.zeros(CONTEXT, np.float32)
        for frames in _whole_frames(blocks):
            with_context = np.empty((len(frames), CONTEXT + FRAME), np.float32)
            with_context[:, CONTEXT:] = frames
            with_context[0, :CONTEXT] = context
            with_context[1:, :CONTEXT] = frames[:-1, -CONTEXT:]
            context = frames[-1, -CONTEXT:].copy()
            probs, *state = self.session.run(["speech_probs", "hn", "cn"], {"input": with_context, "h": state[0], "c": state[1]})
            yield probs.astype(np.float32)


@functools.cache
def _silero_session() -> Any:
    """The model's session, made once per process (a server cuts many recordings) after its
    file is checked against the sha256 it shipped with."""
    import onnxruntime as ort

    data = SILERO_PATH.read_bytes() if SILERO_PATH.is_file() else b""
    if hashlib.sha256(data).hexdigest() != SILERO_SHA256:
        raise BundleError(f"{SILERO_PATH} is missing or altered; reinstall lalm-export, or pass --split energy or --split fixed")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


class EnergyVad:
    """A frame is speech when its RMS level is `margin_db` above the noise floor (the level
    of the quietest tenth of the last 64 blocks' frames, at least -70 dBFS): 1.0 or 0.0 per frame."""

    def __init__(self, margin_db: float = 15.0) -> None:
        self.margin_db = margin_db

    def probabilities(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        levels_seen: list[np.ndarray] = []
        for frames in _whole_frames(blocks):
            levels = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
            levels_seen = [*levels_seen[-63:], levels]  # the recent ones only: memory stays bounded
            floor = max(float(np.quantile(np.concatenate(levels_seen), 0.1)), -70.0)
            yield (levels > floor + self.margin_db).astype(np.float32)


class EveryFrame:
    """`--split fixed`: every frame counts as speech."""

    def probabilities(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for frames in _whole_frames(blocks):
            yield np.ones(len(frames), np.float32)


def detector(split: str) -> SileroVad | EnergyVad | EveryFrame:
    if split == "vad":
        return SileroVad()
    if split == "energy":
        return EnergyVad()
    if split == "fixed":
        return EveryFrame()
    raise ValueError(f"split must be one of {', '.join(SPLITTERS)}, not {split!r}")


def _whole_frames(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """`(frames, FRAME)` arrays of the samples in `blocks`, carrying a partial frame over to
    the next block; the last partial frame zero-padded."""
    rest = np.zeros(0, np.float32)
    for block in blocks:
        samples = np.concatenate([rest, np.asarray(block, np.float32)])
        whole = len(samples) // FRAME * FRAME
        rest = samples[whole:]
        if whole:
            yield samples[:whole].reshape(-1, FRAME)
    if len(rest):
        yield np.pad(rest, (0, FRAME - len(rest)))[None]
