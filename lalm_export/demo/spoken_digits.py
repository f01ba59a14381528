"""Spoken digits: the demo's optional second audio task, where `espeak-ng` is installed. A
clip is one to four digits spoken by espeak-ng ("3 5 1") in one of its English voices and
voice variants, at a random speed and pitch, level and noise; the label is the digits as
text ("351").

Training clips come from a pool synthesized once (espeak-ng takes ~15 ms a clip; a fresh clip
per example would double a step's time), each drawn with a random shift, gain and noise.
Held-out clips are synthesized from another seed: digit sequences, speeds, pitches and voice
mixes the pool never had (the voices themselves are the same)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lalm_export.errors import OptionsError

RATE = 16_000
WINDOW_SECONDS = 3  # four digits at the slowest speed fit
PROMPT = "<|audio|>"
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+f1", "+f2", "+f3", "+f4")
POOL_SEED, HELD_OUT_SEED = 1, 10**12


def espeak() -> str:
    """The espeak-ng executable, or an `OptionsError` that says how to get it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise OptionsError("the spoken-digits task needs espeak-ng on PATH (Debian/Ubuntu: apt-get install espeak-ng); the DTMF task needs nothing")
    return path


def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """16 kHz float32 audio of espeak-ng saying `text`."""
    import soundfile

    from runtime.audio import resample

    wav = subprocess.run([espeak(), "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text], capture_output=True, check=True).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return resample(samples, rate)


def spoken_examples(count: int, seed: int, min_digits: int = 1, max_digits: int = 4, progress: bool = False) -> list[tuple[np.ndarray, str]]:
    """`count` (clip, digits) pairs; the same seed gives the same examples. `progress`: a bar on stderr."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    examples = []
    for _ in tqdm(range(count), desc="   espeak-ng clips", unit="clip", file=sys.stderr, leave=False, mininterval=1.0, disable=not progress):
        digits = "".join(rng.choice(list("0123456789"), size=int(rng.integers(min_digits, max_digits + 1))))
        voice = str(rng.choice(VOICES)) + str(rng.choice(VARIANTS))
        clip = speak(" ".join(digits), voice, int(rng.integers(150, 230)), int(rng.integers(25, 75)))
        clip = clip * rng.uniform(0.3, 1.0) / max(1e-6, float(np.abs(clip).max()))
        clip = clip + rng.uniform(0.001, 0.01) * rng.standard_normal(clip.size)
        examples.append((clip[: WINDOW_SECONDS * RATE].astype(np.float32), digits))
    return examples


def build_spoken_lalm(folder: Path, seed: int = 0):
    """The tiny LALM of `training.build_tiny_lalm` with a 3 s window. (A wider, deeper encoder,
    d_model 128 and 3 layers, did worse in 3,000 steps: 54 % of digits in place against 68 %.)"""
    from lalm_export.demo.training import build_tiny_lalm

    return build_tiny_lalm(folder, WINDOW_SECONDS, PROMPT, seed)


def train_spoken(
    model,
    steps: int = 3000,
    pool: int = 6000,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = False,
) -> None:
    """Synthesize the pool (`progress`: a bar), then train `model` on batches drawn from it:
    one digit first, then one or two, then one to four."""
    from lalm_export.demo.training import curriculum_stage, train_lalm

    examples = spoken_examples(pool, seed=POOL_SEED + seed, progress=progress)
    longest_per_stage = (1, 2, 4)
    by_length = {n: [e for e in examples if len(e[1]) <= n] for n in longest_per_stage}
    rng = np.random.default_rng(seed)

    def batch_for(step: int) -> tuple[list[np.ndarray], list[str]]:
        longest = longest_per_stage[curriculum_stage(step, steps)]
        chosen = [by_length[longest][i] for i in rng.integers(0, len(by_length[longest]), batch)]
        clips = []
        for clip, _ in chosen:
            shifted = np.concatenate([np.zeros(int(rng.integers(0, RATE // 10)), dtype=np.float32), clip])[: WINDOW_SECONDS * RATE]
            clips.append((shifted * rng.uniform(0.5, 1.5) + rng.uniform(0.001, 0.01) * rng.standard_normal(shifted.size)).astype(np.float32))
        return clips, [digits for _, digits in chosen]

    train_lalm(model, batch_for, steps, lr=lr, on_step=on_step)
