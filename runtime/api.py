"""The Python API under `python -m runtime.infer`: `load(bundle)` gives an encoder runner
or a text generator over a verified ONNX Runtime session."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.audio import Audio, check_feature_config, check_samples, features_for, groups_by_shape, load_audio
from runtime.cpu import warn_on_int8_kernel_mismatch
from runtime.errors import BundleError, ContextLengthError, RuntimeUserError
from runtime.generation import DecoderBackend, GenerationOptions, StepClock, check_prompt_text, generate, until_eos
from runtime.lalm import LalmRunner, cut_at_stop, load_lalm
from runtime.limits import audio_limits
from runtime.manifest import Manifest, read_json_object, read_manifest, read_tokenizer, sha256_of, verify_graph_files
from runtime.ort_backends import decoder_backend
from runtime.scheduler import DecodeScheduler
from runtime.sessions import SessionOptions, active_provider, open_bundle_graph, provider_label, resolve_providers, run_options_for


class _BundleModel:
    def __init__(self, folder: str | Path, options: SessionOptions) -> None:
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder)
        source = verify_graph_files(self.folder, self.manifest.graphs["model"])
        reusable = None if options.save_optimized else saved_optimized_graph(source, options)
        self.graph_path = reusable or source
        if reusable is not None:  # already optimized for this provider: skip that work at start-up
            options = SessionOptions(**{**options.__dict__, "optimization": "disable"})
        self.session = open_bundle_graph(self.graph_path, options, self.manifest.graphs["model"], self.folder)
        self.provider = active_provider(self.session)
        if options.save_optimized:
            record_optimized_graph(source, self.provider)
        self.output_names = [o.name for o in self.session.get_outputs()]


def _optimized_record(graph: Path) -> Path:
    return graph.with_suffix(".optimized.json")


def record_optimized_graph(source: Path, provider: str) -> None:
    """Tie the optimized graph to the verified graph it came from and to its provider:
    it is reused only while both match, and only if its own sha256 still matches."""
    optimized = source.with_suffix(".optimized.onnx")
    record = {"source_sha256": sha256_of(source), "sha256": sha256_of(optimized), "provider": provider}
    _optimized_record(source).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def saved_optimized_graph(source: Path, options: SessionOptions) -> Path | None:
    optimized, record_path = source.with_suffix(".optimized.onnx"), _optimized_record(source)
    if not (optimized.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    same_provider = record.get("provider") == provider_label(resolve_providers(options.provider)[0])
    if same_provider and record.get("source_sha256") == sha256_of(source) and record.get("sha256") == sha256_of(optimized):
        return optimized
    return None


@dataclass
class EncodedAudio:
    name: str
    seconds: float
    hidden_states: np.ndarray  # (frames, hidden): the final layer
    all_layers: np.ndarray | None = None  # (layers + 1, frames, hidden) when the bundle exports them
    elapsed_s: float = 0.0


class EncoderRunner(_BundleModel):
    """Audio files or 16 kHz arrays in, final hidden states (and every layer when exported) out."""

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

    def run_on_device(self, features: ort.OrtValue) -> list[ort.OrtValue]:
        """One batch already on `binding_device` in, every output left there: for callers that
        keep working on the device (an LLM consuming the hidden states, a benchmark)."""
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, features)
        for name in self.output_names:
            binding.bind_output(name, self.binding_device or "cpu")
        self.session.run_with_iobinding(binding, run_options_for(self.manifest.input_kind, int(np.prod(features.shape()))))
        return binding.get_outputs()

    def run_batch(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """One batch of model inputs; every output as a host array."""
        if self.binding_device is None:
            options = run_options_for(self.manifest.input_kind, features.size)
            return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: features}, options)))
        device_input = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(features), self.binding_device, 0)
        return {name: value.numpy() for name, value in zip(self.output_names, self.run_on_device(device_input))}

    def encode_files(self, paths: Sequence[str | Path]) -> list[EncodedAudio]:
        return self.encode([load_audio(p, self.limits) for p in paths])

    def encode_arrays(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[EncodedAudio]:
        names = list(names or (f"array{i}" for i in range(len(arrays))))
        return self.encode([Audio(n, check_samples(a, n), 16_000) for n, a in zip(names, arrays)])

    def encode(self, clips: Sequence[Audio]) -> list[EncodedAudio]:
        """Clips of equal input length run as one batch. The exported graphs take no attention
        mask, and padding changes Wav2Vec2's group-normalised features, so unequal lengths
        are never padded together: each such clip runs alone, which keeps results exact."""
        for clip in clips:
            self.check_length(clip)
        features = [features_for(self.manifest.input_kind, clip.samples, self.feature_config) for clip in clips]
        results: dict[int, EncodedAudio] = {}
        for indices in groups_by_shape(features):
            start = time.perf_counter()
            outputs = self.run_batch(np.stack([features[i] for i in indices]))
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


@dataclass
class Completion:
    prompt: str
    text: str
    tokens: list[int]
    time_to_first_token_s: float
    tokens_per_s: float
    timings: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0


class TextGenerator(_BundleModel):
    """Prompts in, text out: tokenization, left padding, the generation loop, stop strings."""

    def __init__(self, folder: str | Path, options: SessionOptions) -> None:
        super().__init__(folder, options)
        self.tokenizer = read_tokenizer(self.folder)
        extra = self.manifest.extra
        self.context_length = context_length(self.manifest, self.folder)
        self.eos_token_id = extra.get("eos_token_id")
        self.pad_token_id = extra.get("pad_token_id", self.eos_token_id) or 0
        # The KV cache lives in pre-allocated buffers on the provider's device (IO binding): on
        # CUDA it never crosses to the host; on the CPU it saves an allocation per step.
        self.backend = self.new_backend()

    def new_backend(self) -> DecoderBackend:
        """A backend of its own (KV buffers included) over the shared session: one per
        generation running at the same time as others."""
        return decoder_backend(self.session, binding_device=self.provider)

    def new_scheduler(self, on_step: Callable[[int], None] | None = None) -> DecodeScheduler:
        """A scheduler whose generations share one decoder call per decode step (a server's)."""
        return DecodeScheduler(self.session, binding_device=self.provider if self.provider == "cuda" else None, on_step=on_step)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, left-padded so that every prompt ends at the last column."""
        if not prompts:
            raise RuntimeUserError("no prompt given; pass at least one prompt")
        for prompt in prompts:
            check_prompt_text(prompt)
        encoded = [self.tokenizer.encode(p).ids for p in prompts]
        if any(not ids for ids in encoded):
            raise RuntimeUserError("a prompt encodes to no tokens; pass non-empty text")
        width = max(map(len, encoded))
        ids = np.full((len(encoded), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens) :] = tokens
            mask[row, width - len(tokens) :] = 1
        return ids, mask

    def check_prompts(self, prompts: Sequence[str], options: GenerationOptions) -> tuple[np.ndarray, np.ndarray]:
        """Valid options, prompts that encode, and room in the context for them and the new tokens: ids and mask."""
        options.validate()
        ids, mask = self.encode_prompts(prompts)
        if ids.shape[1] + options.max_new_tokens > self.context_length:
            raise ContextLengthError(ids.shape[1], options.max_new_tokens, self.context_length)
        return ids, mask

    def decode(self, tokens: Sequence[int]) -> str:
        kept = [t for t in tokens if t != self.eos_token_id]
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def complete(
        self,
        prompts: Sequence[str],
        options: GenerationOptions,
        stop_strings: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        backend: DecoderBackend | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Completion]:
        """Generate for each prompt; `on_text` streams the first prompt's new text as it comes.
        `backend`: one of `new_backend()`'s, for callers running generations side by side;
        `cancelled()` true ends the generation (`GenerationCancelled`)."""
        ids, mask = self.check_prompts(prompts, options)
        if options.eos_token_id is None:
            options = replace(options, eos_token_id=self.eos_token_id)
        clock = StepClock(lambda row: self._text(row, options, stop_strings), on_text, cancelled)

        def stop(tokens: np.ndarray) -> np.ndarray:
            return np.array([any(s in self.decode(row) for s in stop_strings) for row in tokens], dtype=bool)

        start = time.perf_counter()
        tokens = generate(backend or self.backend, ids, mask, options, stop=stop if stop_strings else None, on_step=clock)
        end = time.perf_counter()
        ttft, rate = clock.first(end) - start, clock.tokens_per_s(end)
        completions = []
        for prompt, row, prompt_row in zip(prompts, tokens, mask):
            kept = until_eos(row, options)
            text = self._text(kept, options, stop_strings)
            timings = {"total_s": round(end - start, 6)}
            completions.append(Completion(prompt, text, kept, round(ttft, 6), round(rate, 3), timings, int(prompt_row.sum())))
        clock.finish(completions[0].text)
        return completions

    def _text(self, tokens: Sequence[int], options: GenerationOptions, stop_strings: Sequence[str]) -> str:
        """The completion's text: up to its first EOS when generation stops there, cut at a stop string."""
        kept = until_eos(tokens, options)
        return cut_at_stop(self.decode(kept), stop_strings)


def context_length(manifest: Manifest, folder: Path) -> int:
    """The positions the decoder was exported for: from the manifest, else (bundles written
    before it recorded them) the bundle's config.json."""
    recorded = manifest.extra.get("context_length")
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    config = read_json_object(folder / "config.json", "bundle file")
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or positions < 1:
        raise BundleError(f"bundle {folder} records no context length (manifest extra.context_length or config max_position_embeddings)")
    return positions


def load(folder: str | Path, options: SessionOptions | None = None) -> EncoderRunner | TextGenerator | LalmRunner:
    """An encoder runner, a text generator or (LALM bundles) an audio-to-text runner for the bundle in `folder`."""
    options = options or SessionOptions()
    manifest = read_manifest(folder)
    warn_on_int8_kernel_mismatch(manifest.int8_record(), folder)
    if manifest.role == "lalm":
        return load_lalm(Path(folder), manifest, options)
    return EncoderRunner(folder, options) if manifest.role == "encoder" else TextGenerator(folder, options)
