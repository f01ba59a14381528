"""DTMF key tones: an audio → text task whose answer is in the audio and needs no download,
for the demo and the end-to-end test. Each key is two sine tones (a row and a column
frequency); a clip holds 3-6 keys with short gaps, at random levels and durations, under
noise. The label is the keys as text ("4170").

A tiny LALM learns it in about 1,200 steps (two minutes on 2 cores): a Whisper-style encoder
(its log-mel front end resolves the tone frequencies) with a 2 s window, a projector and a
small Llama-style decoder, all trained, with a curriculum from one key to six."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

RATE = 16_000
ROWS = (697, 770, 852, 941)
COLUMNS = (1209, 1336, 1477)
# The telephone keypad: key -> (row, column)
KEYPAD = {"1": (0, 0), "2": (0, 1), "3": (0, 2), "4": (1, 0), "5": (1, 1), "6": (1, 2), "7": (2, 0), "8": (2, 1), "9": (2, 2), "0": (3, 1)}
WINDOW_SECONDS = 2  # the encoder's window: 6 keys of at most 130 ms with gaps of at most 40 ms fit
PROMPT = "<|audio|>"
HELD_OUT_SEED = 10**12  # far from every training step's seed: held-out clips are never trained on


def dtmf_clip(keys: str, rng: np.random.Generator) -> np.ndarray:
    """16 kHz float32 audio of `keys` pressed one after another."""
    parts = [np.zeros(int(rng.uniform(0.0, 0.02) * RATE), dtype=np.float32)]
    for key in keys:
        row, column = KEYPAD[key]
        t = np.arange(int(rng.uniform(0.07, 0.13) * RATE)) / RATE
        level = rng.uniform(0.1, 0.5)
        tone = np.sin(2 * np.pi * ROWS[row] * t + rng.uniform(0, 2 * np.pi)) + np.sin(2 * np.pi * COLUMNS[column] * t + rng.uniform(0, 2 * np.pi))
        ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)  # 5 ms fades: no clicks
        parts += [(0.5 * level * tone * ramp).astype(np.float32), np.zeros(int(rng.uniform(0.02, 0.04) * RATE), dtype=np.float32)]
    clip = np.concatenate(parts)
    return (clip + rng.uniform(0.001, 0.02) * rng.standard_normal(clip.size)).astype(np.float32)


def dtmf_examples(count: int, seed: int, min_keys: int = 3, max_keys: int = 6) -> list[tuple[np.ndarray, str]]:
    """`count` (clip, keys) pairs; the same seed gives the same examples."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        keys = "".join(rng.choice(list(KEYPAD), size=int(rng.integers(min_keys, max_keys + 1))))
        examples.append((dtmf_clip(keys, rng), keys))
    return examples


def key_accuracy(expected: list[str], predicted: list[str]) -> float:
    """Share of expected keys that the prediction has at the same place."""
    total = sum(len(e) for e in expected)
    right = sum(sum(a == b for a, b in zip(e, p)) for e, p in zip(expected, predicted))
    return right / total if total else 0.0


def edit_error_rate(expected: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """Edit distance (keys dropped, added or wrong) over the expected keys, summed over clips:
    unlike `key_accuracy`, a dropped key costs one, not every key after it. A clip is a string
    of keys, or any sequence of symbols (`benchmarks.real_lalm` gives lists of words)."""
    total = sum(len(e) for e in expected)
    return sum(_edit_distance(e, p) for e, p in zip(expected, predicted)) / total if total else 0.0


def _edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def build_dtmf_lalm(folder: Path, seed: int = 0):
    """The tiny LALM for the task (`training.build_tiny_lalm`) with a 2 s window."""
    from lalm_export.demo.training import build_tiny_lalm

    return build_tiny_lalm(folder, WINDOW_SECONDS, PROMPT, seed)


def curriculum(step: int, steps: int) -> tuple[int, int]:
    """Keys per clip at `step`: one key first (the decoder learns to read the audio), then
    one to three, then the task's three to six."""
    from lalm_export.demo.training import curriculum_stage

    return ((1, 1), (1, 3), (3, 6))[curriculum_stage(step, steps)]


# The one-cycle peak learning rate. At 3e-3 the outcome depended on the floating-point path:
# 95.8-98.2 % of held-out keys here (AVX-512), 86.6 % with PyTorch's AVX2 kernels at 2 threads;
# at 1.5e-3, 98.2-99.3 % on both (docs/performance-notes.md).
DTMF_LR = 1.5e-3


def train_dtmf(model, steps: int = 1200, batch: int = 16, lr: float = DTMF_LR, seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> None:
    """Train `model` on fresh DTMF clips each step (no clip is seen twice)."""
    from lalm_export.demo.training import train_lalm

    def batch_for(step: int) -> tuple[list[np.ndarray], list[str]]:
        low, high = curriculum(step, steps)
        examples = dtmf_examples(batch, seed=seed * 1_000_003 + step, min_keys=low, max_keys=high)
        return [clip for clip, _ in examples], [keys for _, keys in examples]

    train_lalm(model, batch_for, steps, lr=lr, on_step=on_step)
