"""The clip lengths a bundle's encoder takes: no shorter than its convolution front end's
receptive field, no longer than it encodes at once."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from runtime.audio import Audio
from runtime.errors import AudioError
from runtime.manifest import Manifest, read_json_object

# The longest clip a raw-audio encoder runs at once, whatever the memory: the exported graphs
# take whole clips. Whisper's limit is its window.
MAX_RAW_AUDIO_SECONDS = 120.0

# Attention memory grows with the square of the frames. Measured peak memory above the loaded
# session, one clip through a wav2vec2-base graph (12 heads, hidden 768, fp32, ONNX Runtime on
# the CPU; `python -m benchmarks clip-memory`, benchmarks/results/clip-memory.json): 10 s
# 0.13 GB, 20 s 0.26, 40 s 0.53, 60 s 0.96, 100 s 5.18 GB. `clip_memory_bytes` is above each,
# with room for other ONNX Runtime versions: four score-sized buffers per attention (scores,
# softmax, their copies as the arena rounds them) and activations of 600 bytes per frame and
# hidden unit (tests/runtime/test_limits.py holds it above the figures).
SCORE_BUFFERS = 4
ACTIVATION_BYTES = 600


def clip_memory_bytes(frames: int, heads: int, hidden: int) -> int:
    """An upper bound of the memory one clip of `frames` encoder frames takes in a graph with
    `heads` attention heads and `hidden` units (fp32)."""
    return SCORE_BUFFERS * heads * frames * frames * 4 + ACTIVATION_BYTES * hidden * frames


def default_clip_memory_gb() -> float:
    """The memory one clip may take when the user does not say: a quarter of this machine's,
    at most 8 GB (the server runs several clips and a decoder beside it)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        physical = 16e9
    return min(8.0, physical / 4 / 1e9)


def seconds_within(budget_bytes: float, heads: int, hidden: int, frame_samples: int) -> float:
    """The longest clip whose `clip_memory_bytes` fits the budget."""
    a, b = SCORE_BUFFERS * heads * 4, ACTIVATION_BYTES * hidden
    frames = (-b + math.sqrt(b * b + 4 * a * budget_bytes)) / (2 * a)
    return frames * frame_samples / 16_000


@dataclass(frozen=True)
class AudioLimits:
    min_samples: int  # the convolution front end's receptive field: no frame comes from fewer
    max_seconds: float
    memory_gb: float | None = None  # the clip memory budget that set max_seconds, if it did

    def check(self, clip: Audio) -> None:
        if len(clip.samples) < self.min_samples:
            raise AudioError(
                f"{clip.name}: {len(clip.samples)} samples ({clip.seconds * 1e3:.2f} ms) is shorter than the encoder's receptive field "
                f"of {self.min_samples} samples ({self.min_samples / 16:.1f} ms at 16 kHz); pass a longer clip"
            )
        self.check_duration(clip.name, clip.seconds)

    def check_duration(self, name: str, seconds: float, source: str = "") -> None:
        """Refuse `seconds` of audio past `max_seconds`; `source` says how they are known (a header)."""
        if seconds > self.max_seconds:
            why = f", within {self.memory_gb:g} GB of memory for one clip (--max-clip-memory-gb)" if self.memory_gb else ""
            raise AudioError(
                f"{name}: {seconds:.1f} s of audio{source}, more than this bundle encodes at once ({self.max_seconds:g} s{why}); "
                f"split it into clips of at most {self.max_seconds:g} s"
            )


def audio_limits(manifest: Manifest, folder: Path, memory_gb: float | None = None) -> AudioLimits:
    """The clip lengths a bundle encodes: from its encoder's convolution front end (`config.json`;
    an audio LLM bundle records it in the manifest) up to its window. A log-mel encoder's window
    is its feature extractor's `chunk_length` (longer audio would be cut off), else the manifest's.
    A raw-audio encoder takes clips up to what fits `memory_gb` (default `default_clip_memory_gb`)
    by `clip_memory_bytes`, and at most MAX_RAW_AUDIO_SECONDS."""
    if (folder / "config.json").is_file():
        config = read_json_object(folder / "config.json", "bundle file")
        min_samples = receptive_field(config)
    else:  # an audio LLM bundle: its encoder's facts in the manifest
        config = manifest.extra.get("encoder", {})
        min_samples = int(config.get("receptive_field_samples", 1))
    chunk = manifest.extra.get("chunk_seconds")
    if manifest.input_kind == "log_mel":
        chunk = read_json_object(folder / "preprocessor_config.json", "bundle file").get("chunk_length", chunk)
        return AudioLimits(min_samples=min_samples, max_seconds=float(chunk) if chunk else MAX_RAW_AUDIO_SECONDS)
    heads, hidden, stride = config.get("num_attention_heads"), config.get("hidden_size"), frame_samples(config)
    if not all(isinstance(v, int) and v > 0 for v in (heads, hidden, stride)):  # a bundle written before these were recorded
        return AudioLimits(min_samples=min_samples, max_seconds=MAX_RAW_AUDIO_SECONDS)
    budget = memory_gb or default_clip_memory_gb()
    within = math.floor(seconds_within(budget * 1e9, heads, hidden, stride))
    if within >= MAX_RAW_AUDIO_SECONDS:
        return AudioLimits(min_samples=min_samples, max_seconds=MAX_RAW_AUDIO_SECONDS)
    return AudioLimits(min_samples=min_samples, max_seconds=float(max(within, 1)), memory_gb=round(budget, 2))


def frame_samples(config: dict) -> int | None:
    """Input samples per output frame: the product of the convolution strides (`conv_stride`;
    an audio LLM bundle records it as `frame_samples`)."""
    if isinstance(config.get("frame_samples"), int):
        return config["frame_samples"]
    strides = config.get("conv_stride")
    return math.prod(int(s) for s in strides) if strides else None


def receptive_field(config: dict) -> int:
    """Input samples behind one output frame of a convolutional front end (`conv_kernel`,
    `conv_stride` in the config); 1 for models without one (Whisper pads to its window)."""
    kernels, strides = config.get("conv_kernel"), config.get("conv_stride")
    if not kernels or not strides:
        return 1
    samples = 1
    for kernel, stride in zip(reversed(kernels), reversed(strides)):
        samples = (samples - 1) * int(stride) + int(kernel)
    return samples
