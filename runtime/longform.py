"""Recordings longer than a bundle's window: read in blocks (never whole), cut at the pauses a
voice-activity detector finds (`runtime.vad`) into pieces no longer than the window, silence
skipped; speech without a pause is cut at the window with an overlap whose repeated words are
dropped when the texts are joined. Memory depends on the window and the batch of pieces, not on
the recording's length: the detector reads blocks, and each batch of pieces is read from the
file when it is transcribed."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.audio import TARGET_RATE, UNREADABLE, Audio, check_audio_path, check_samples, resample, unreadable
from runtime.errors import AudioError
from runtime.vad import FRAME, detector

BLOCK_SECONDS = 30.0  # audio the detector reads at once
PIECE_SECONDS = 30.0  # the longest piece, below a longer window (a raw-audio encoder's memory grows with the square)
OVERLAP_SECONDS = 1.0  # shared by two pieces cut inside speech
JOIN_GAP_SECONDS = 2.0  # pauses up to this long stay inside a piece; longer silence is skipped
# Kept before and after each stretch of speech, by splitter: Silero's default 30 ms both sides (its
# probabilities rise after an onset); an energy frame is loud from the onset's frame on, which
# already starts up to a frame (32 ms) early, so only the tail is kept (a tone's decay). On the
# DTMF demo's 5-minute recording these give the single-clip key accuracy (docs/long-recordings.md).
SPEECH_PAD_SECONDS = {"vad": (0.03, 0.03), "energy": (0.0, 0.03), "fixed": (0.0, 0.0)}
MIN_SPEECH_SECONDS = 0.25  # shorter bursts are noise (Silero's default)
MIN_PAUSE_SECONDS = 0.1  # a shorter pause does not end a stretch of speech (Silero's default)
THRESHOLD = 0.5  # a frame is speech at this probability; speech ends below THRESHOLD - 0.15


@dataclass(frozen=True)
class Piece:
    start: int  # samples at 16 kHz
    end: int
    overlaps_previous: bool = False  # cut inside speech: it shares OVERLAP_SECONDS with the piece before

    @property
    def seconds(self) -> tuple[float, float]:
        return round(self.start / TARGET_RATE, 3), round(self.end / TARGET_RATE, 3)


@dataclass
class Segment:
    """One piece's text: OpenAI's verbose_json segment fields."""

    id: int
    start: float  # seconds
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)


class Recording:
    """A recording of any length, as 16 kHz mono: its duration from the header, its samples
    block by block in order, and any span of them. A file, the bytes of one (an upload), or an
    array already in memory."""

    def __init__(self, name: str, source: Any) -> None:
        self.name = name
        self._source = source
        self._array = np.asarray(source, np.float32) if isinstance(source, np.ndarray) else None
        if self._array is not None:
            check_samples(self._array, name)
            self.rate, self.frames, self.channels = TARGET_RATE, len(self._array), 1
            return
        import soundfile

        try:
            info = soundfile.info(self._opened())
        except UNREADABLE as err:
            raise unreadable(name, err) from err
        if info.samplerate <= 0 or info.frames <= 0:
            raise AudioError(f"{name}: the audio has no samples (its header says {info.frames} frames at {info.samplerate} Hz)")
        self.rate, self.frames, self.channels = info.samplerate, info.frames, info.channels

    @classmethod
    def of(cls, clip: str | Path | bytes | np.ndarray | Audio, name: str | None = None) -> Recording:
        if isinstance(clip, bytes):
            return cls(name or "upload", clip)
        if isinstance(clip, Audio):
            return cls(clip.name, clip.samples)
        if isinstance(clip, np.ndarray):
            return cls(name or "array", clip)
        return cls(name or Path(clip).name, str(check_audio_path(clip)))

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    def _opened(self) -> Any:
        return io.BytesIO(self._source) if isinstance(self._source, bytes) else self._source

    def blocks(self, seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
        """The recording's 16 kHz mono samples in order, `seconds` at a time (resampled as one stream)."""
        if self._array is not None:
            step = int(seconds * TARGET_RATE)
            yield from (self._array[at : at + step] for at in range(0, len(self._array), step))
            return
        import soundfile
        import soxr

        stream = None if self.rate == TARGET_RATE else soxr.ResampleStream(self.rate, TARGET_RATE, 1, dtype="float32", quality="HQ")
        size = max(1, int(seconds * self.rate))
        with soundfile.SoundFile(self._opened()) as handle:
            read = 0
            while read < self.frames:
                block = self._mono(handle.read(size, dtype="float32", always_2d=True))
                read += len(block)
                if not len(block):
                    break
                yield block if stream is None else stream.resample_chunk(block, last=read >= self.frames)

    def span(self, start: int, end: int) -> np.ndarray:
        """16 kHz samples `start:end` (positions at 16 kHz), read from the file on demand."""
        if self._array is not None:
            return self._array[start:end]
        import soundfile

        first, last = int(start * self.rate / TARGET_RATE), int(np.ceil(end * self.rate / TARGET_RATE))
        with soundfile.SoundFile(self._opened()) as handle:
            handle.seek(first)
            samples = self._mono(handle.read(last - first, dtype="float32", always_2d=True))
        return resample(samples, self.rate)[: end - start]

    def _mono(self, block: np.ndarray) -> np.ndarray:
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
        if not np.isfinite(mono).all():
            raise AudioError(f"{self.name}: the audio contains NaN or infinite samples; fix or re-encode the file")
        return np.ascontiguousarray(mono)


def speech_regions(probabilities: np.ndarray, total: int, pad_seconds: tuple[float, float] = SPEECH_PAD_SECONDS["vad"]) -> list[tuple[int, int]]:
    """Stretches of speech `(start, end)` in samples from one probability per frame, as Silero's
    `get_speech_timestamps` finds them by default: speech starts at THRESHOLD and ends below
    THRESHOLD - 0.15, pauses under MIN_PAUSE_SECONDS do not end it, bursts under
    MIN_SPEECH_SECONDS are dropped; each is padded by `pad_seconds` before and after (half the
    pause to its neighbour at most)."""
    regions: list[list[int]] = []
    speaking = False
    for index, probability in enumerate(probabilities):
        if not speaking and probability >= THRESHOLD:
            speaking = True
            if regions and index * FRAME - regions[-1][1] < MIN_PAUSE_SECONDS * TARGET_RATE:
                continue  # too short a pause: the stretch goes on
            regions.append([index * FRAME, (index + 1) * FRAME])
        elif speaking and probability < THRESHOLD - 0.15:
            speaking = False
        if speaking:
            regions[-1][1] = (index + 1) * FRAME
    kept = [(start, min(end, total)) for start, end in regions if end - start >= MIN_SPEECH_SECONDS * TARGET_RATE]
    pad_before, pad_after = (seconds * TARGET_RATE for seconds in pad_seconds)
    padded = []
    for index, (start, end) in enumerate(kept):
        before = start if index == 0 else (start - kept[index - 1][1]) / 2
        after = total - end if index == len(kept) - 1 else (kept[index + 1][0] - end) / 2
        padded.append((int(start - min(pad_before, before)), int(end + min(pad_after, after))))
    return padded


def plan_pieces(regions: list[tuple[int, int]], window_seconds: float) -> list[Piece]:
    """Pieces of at most `window_seconds` (and PIECE_SECONDS), cut at pauses: consecutive stretches
    of speech share a piece while it fits and the pause between them is under JOIN_GAP_SECONDS
    (longer silence is skipped); a stretch longer than a piece is cut into windows that overlap by
    OVERLAP_SECONDS."""
    longest = int(min(window_seconds, PIECE_SECONDS) * TARGET_RATE)
    overlap = int(min(OVERLAP_SECONDS, window_seconds / 4) * TARGET_RATE)
    pieces: list[Piece] = []
    for start, end in regions:
        if pieces and end - pieces[-1].start <= longest and start - pieces[-1].end <= JOIN_GAP_SECONDS * TARGET_RATE:
            pieces[-1] = Piece(pieces[-1].start, end, pieces[-1].overlaps_previous)
            continue
        at, first = start, True
        while True:
            cut = min(end, at + longest)
            pieces.append(Piece(at, cut, overlaps_previous=not first))
            if cut >= end:
                break
            at, first = cut - overlap, False
    return pieces


def pieces_of(recording: Recording, split: str, window_seconds: float) -> list[Piece]:
    """Where `recording` is cut, by the `split` detector (`runtime.vad`), reading it in blocks."""
    probabilities = np.concatenate(list(detector(split).probabilities(recording.blocks())) or [np.zeros(0, np.float32)])
    total = int(round(recording.seconds * TARGET_RATE))
    return plan_pieces(speech_regions(probabilities, total, SPEECH_PAD_SECONDS[split]), window_seconds)


_WORD = re.compile(r"\w+")


def joined_text(texts: list[str], pieces: list[Piece]) -> str:
    """The pieces' texts in order, separated by spaces, each joined as `words_to_add` says."""
    words: list[str] = []
    for text, piece in zip(texts, pieces):
        words += words_to_add(words, text, piece)
    return " ".join(words)


def words_to_add(words: list[str], text: str, piece: Piece) -> list[str]:
    """The words of `piece`'s `text` that follow `words` (the text so far): all of them, but
    where the piece overlaps the one before, the longest run of words (at most 8, the words an
    overlap can hold) that ends `words` and starts `text` is kept once."""
    new = text.split()
    if piece.overlaps_previous and words:
        key = [_normal(w) for w in words[-8:]]
        for k in range(min(8, len(new), len(key)), 0, -1):
            if key[-k:] == [_normal(w) for w in new[:k]]:
                return new[k:]
    return new


def _normal(word: str) -> str:
    return "".join(_WORD.findall(word.lower()))


def piece_audio(recording: Recording, piece: Piece) -> Audio:
    """A piece as a clip of its own, named after the recording and its place in it."""
    name = f"{recording.name}@{piece.seconds[0]:.2f}-{piece.seconds[1]:.2f}s"
    return Audio(name, recording.span(piece.start, piece.end), recording.rate)
