"""`--calibration-audio`: recordings like the ones a bundle will hear, for the parity gate and
for an int8 audio encoder's calibration.

The gate's own clips are synthetic (`signals.speech_like`). An int8 encoder fitted and judged on
them alone once passed while real speech broke it (Whisper tiny.en: cosine 0.9994 on them, 0.68
on a real recording; docs/performance-notes.md). Recordings given here join the gate's clips:
the int8 search fits its smoothing and meets its bound on them too, and the gate judges every
clip, its bound unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lalm_export.errors import OptionsError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
MAX_RECORDINGS = 8  # each adds an encoder run per int8 search step and 32 greedy tokens to the gate
RATE = 16_000
SHORTEST_SECONDS = 0.1


@dataclass(frozen=True)
class Recordings:
    """The recordings read from `path`."""

    path: Path
    clips: tuple[tuple[str, np.ndarray], ...]  # (file name, 16 kHz mono samples)

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of them."""
        return {"path": str(self.path.resolve()), "files": [name for name, _ in self.clips], "seconds": [round(len(c) / RATE, 2) for _, c in self.clips]}

    def cut(self, seconds: float) -> Recordings:
        """Each recording's first `seconds`: what an encoder with that window reads of it at once."""
        return Recordings(self.path, tuple((name, clip[: int(seconds * RATE)]) for name, clip in self.clips))


def audio_files(path: Path) -> list[Path]:
    """`path` itself, or the audio files in the folder `path` (sorted, at most `MAX_RECORDINGS`)."""
    if not path.exists():
        raise OptionsError(f"--calibration-audio {path} does not exist; pass a recording or a folder of them ({', '.join(AUDIO_SUFFIXES)})")
    if path.is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not found:
        raise OptionsError(f"--calibration-audio {path} holds no audio files ({', '.join(AUDIO_SUFFIXES)}); pass recordings like the ones the bundle will hear")
    return found[:MAX_RECORDINGS]


def read_recordings(path: Path) -> Recordings:
    """The recordings at `path`, decoded to 16 kHz mono; one line naming the file for one that
    cannot be read, holds NaNs, or is too short to encode."""
    from runtime.audio import load_audio
    from runtime.errors import RuntimeUserError

    path = Path(path).expanduser()
    clips = []
    for file in audio_files(path):
        try:
            samples = load_audio(file).samples
        except RuntimeUserError as err:
            raise OptionsError(f"--calibration-audio: {err}") from err
        if len(samples) < SHORTEST_SECONDS * RATE:
            raise OptionsError(f"--calibration-audio: {file} is {len(samples) / RATE:.3f} s long; give recordings of at least {SHORTEST_SECONDS} s")
        clips.append((file.name, samples.astype(np.float32)))
    return Recordings(path, tuple(clips))
