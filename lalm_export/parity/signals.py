"""Synthetic test audio in numpy: what the parity gate, the demo and the benchmarks feed
the encoders when no recording is at hand."""

from __future__ import annotations

import numpy as np


def speech_like(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Speech-like audio (float32): voiced harmonics under a syllable-rate envelope, plus
    breath noise. The quiet stretches between syllables are where a reduced precision loses most."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
