"""DTMF key tones: a task whose answer is in the audio and needs no download. Each key is two
sine tones (a row and a column frequency); a clip holds 3-6 keys with short gaps, at random
levels and durations, under noise. The label is the keys as text ("4170")."""

from __future__ import annotations

import numpy as np

RATE = 16_000
ROWS = (697, 770, 852, 941)
COLUMNS = (1209, 1336, 1477)
# The telephone keypad: key -> (row, column)
KEYPAD = {"1": (0, 0), "2": (0, 1), "3": (0, 2), "4": (1, 0), "5": (1, 1), "6": (1, 2), "7": (2, 0), "8": (2, 1), "9": (2, 2), "0": (3, 1)}


def dtmf_clip(keys: str, rng: np.random.Generator) -> np.ndarray:
    """16 kHz float32 audio of `keys` pressed one after another."""
    parts = [np.zeros(int(rng.uniform(0.02, 0.1) * RATE), dtype=np.float32)]
    for key in keys:
        row, column = KEYPAD[key]
        t = np.arange(int(rng.uniform(0.07, 0.13) * RATE)) / RATE
        level = rng.uniform(0.1, 0.5)
        tone = np.sin(2 * np.pi * ROWS[row] * t + rng.uniform(0, 2 * np.pi)) + np.sin(2 * np.pi * COLUMNS[column] * t + rng.uniform(0, 2 * np.pi))
        ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)  # 5 ms fades: no clicks
        parts += [(0.5 * level * tone * ramp).astype(np.float32), np.zeros(int(rng.uniform(0.04, 0.09) * RATE), dtype=np.float32)]
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
