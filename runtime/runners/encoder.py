"""An encoder bundle's runner: audio in, hidden states (and every layer when exported) out."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort

from runtime.audio import Audio, check_feature_config, check_samples, features_for, groups_by_shape, load_audio
from runtime.limits import audio_limits
from runtime.manifest import read_json_object
from runtime.runners.bundle import BundleModel
from runtime.sessions import SessionOptions, run_options_for


@dataclass
class EncodedAudio:
    name: str
    seconds: float
    hidden_states: np.ndarray  # (frames, hidden): the final layer
    all_layers: np.ndarray | None = None  # (layers + 1, frames, hidden) when the bundle exports them
    elapsed_s: float = 0.0


class EncoderRunner(BundleModel):
    """Audio files or 16 kHz arrays in, final hidden states (and every layer when exported) out."""

    role: ClassVar[str] = "encoder"

    def __init__(self, folder: str | Path, options: SessionOptions) -> None:
        super().__init__(folder, options)
        self.feature_config = read_json_object(self.folder / "preprocessor_config.json", "bundle file")
        check_feature_config(self.feature_config, self.manifest.input_kind, str(self.folder / "preprocessor_config.json"))
        self.input_name = self.session.get_inputs()[0].name
        self.limits = audio_limits(self.manifest, self.folder, options.max_clip_memory_gb)
        # On CUDA inputs and outputs go through IO binding (device buffers, no staging copies).
        self.binding_device = "cuda" if self.provider == "cuda" else None

    def check_length(self, clip: Audio) -> None:
        """Refuse a clip shorter than the encoder's receptive field or longer than it encodes at once."""
        self.limits.check(clip)

    def run_on_device(self, features: ort.OrtValue, shrink_arena: bool = False) -> list[ort.OrtValue]:
        """One batch already on `binding_device` in, every output left there: for callers that
        keep working on the device (an LLM consuming the hidden states, a benchmark)."""
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, features)
        for name in self.output_names:
            binding.bind_output(name, self.binding_device or "cpu")
        self.session.run_with_iobinding(binding, run_options_for(self.manifest.input_kind, int(np.prod(features.shape())), shrink_arena))
        return binding.get_outputs()

    def run_batch(self, features: np.ndarray, shrink_arena: bool = False) -> dict[str, np.ndarray]:
        """One batch of model inputs; every output as a host array. `shrink_arena`: the session's
        memory arena gives back what the run took (`runtime.sessions.run_options_for`)."""
        if self.binding_device is None:
            options = run_options_for(self.manifest.input_kind, features.size, shrink_arena)
            return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: features}, options)))
        device_input = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(features), self.binding_device, 0)
        return {name: value.numpy() for name, value in zip(self.output_names, self.run_on_device(device_input, shrink_arena))}

    def encode_files(self, paths: Sequence[str | Path]) -> list[EncodedAudio]:
        return self.encode([load_audio(p, self.limits) for p in paths])

    def encode_arrays(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[EncodedAudio]:
        names = list(names or (f"array{i}" for i in range(len(arrays))))
        return self.encode([Audio(n, check_samples(a, n), 16_000) for n, a in zip(names, arrays)])

    def encode(self, clips: Sequence[Audio], shrink_arena: bool = False) -> list[EncodedAudio]:
        """Clips of equal input length run as one batch. The exported graphs take no attention
        mask, and padding changes Wav2Vec2's group-normalised features, so unequal lengths
        are never padded together: each such clip runs alone, which keeps results exact.
        `shrink_arena`: memory a batch took goes back after it (a server's batches)."""
        for clip in clips:
            self.check_length(clip)
        features = [features_for(self.manifest.input_kind, clip.samples, self.feature_config) for clip in clips]
        results: dict[int, EncodedAudio] = {}
        for indices in groups_by_shape(features):
            start = time.perf_counter()
            outputs = self.run_batch(np.stack([features[i] for i in indices]), shrink_arena)
            elapsed = (time.perf_counter() - start) / len(indices)
            layers = sorted((n for n in outputs if n.startswith("hidden_states.")), key=lambda n: int(n.split(".")[1]))
            for row, index in enumerate(indices):
                results[index] = EncodedAudio(
                    name=clips[index].name,
                    seconds=clips[index].seconds,
                    hidden_states=outputs["last_hidden_state"][row],
                    all_layers=np.stack([outputs[n][row] for n in layers]) if layers else None,
                    elapsed_s=elapsed,
                )
        return [results[i] for i in range(len(clips))]
