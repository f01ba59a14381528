"""The clip lengths a bundle's encoder takes: no shorter than its convolution front end's
receptive field, no longer than it encodes at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.audio import Audio
from runtime.errors import AudioError
from runtime.manifest import Manifest, read_json_object

# The longest clip a raw-audio encoder runs at once: attention memory grows with the square of
# the frames, and the exported graphs take whole clips. Whisper's limit is its window.
MAX_RAW_AUDIO_SECONDS = 120.0


@dataclass(frozen=True)
class AudioLimits:
    min_samples: int  # the convolution front end's receptive field: no frame comes from fewer
    max_seconds: float

    def check(self, clip: Audio) -> None:
        if len(clip.samples) < self.min_samples:
            raise AudioError(
                f"{clip.name}: {len(clip.samples)} samples ({clip.seconds * 1e3:.2f} ms) is shorter than the encoder's receptive field "
                f"of {self.min_samples} samples ({self.min_samples / 16:.1f} ms at 16 kHz); pass a longer clip"
            )
        if clip.seconds > self.max_seconds:
            raise AudioError(
                f"{clip.name}: {clip.seconds:.1f} s of audio, more than this bundle encodes at once ({self.max_seconds:g} s); "
                f"split it into clips of at most {self.max_seconds:g} s"
            )


def audio_limits(manifest: Manifest, folder: Path) -> AudioLimits:
    """The clip lengths a bundle encodes: from its encoder's convolution front end (`config.json`;
    an audio LLM bundle records it in the manifest) up to its window. A log-mel encoder's window
    is its feature extractor's `chunk_length` (longer audio would be cut off), else the manifest's."""
    if (folder / "config.json").is_file():
        min_samples = receptive_field(read_json_object(folder / "config.json", "bundle file"))
    else:
        min_samples = int(manifest.extra.get("encoder", {}).get("receptive_field_samples", 1))
    chunk = manifest.extra.get("chunk_seconds")
    if manifest.input_kind == "log_mel":
        chunk = read_json_object(folder / "preprocessor_config.json", "bundle file").get("chunk_length", chunk)
    return AudioLimits(min_samples=min_samples, max_seconds=float(chunk) if chunk else MAX_RAW_AUDIO_SECONDS)


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
