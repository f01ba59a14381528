"""Audio → text with an LALM bundle, torch-free: the audio encoder graph gives each clip's
projected frames, the prompt's token embeddings come from the bundle's token table with the
frames at the placeholder, and the decoder graph generates from those embeddings."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.audio import Audio, check_samples, features_for, load_audio
from runtime.errors import BundleError, ContextLengthError, RuntimeUserError
from runtime.generation import GenerationOptions, PromptEmbeds, generate, until_eos
from runtime.ort_backends import OrtDecoderBackend


def prompt_embeddings(prompt_ids: Sequence[int], audio_token_id: int, table: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """`(positions, hidden)`: the prompt's rows of the token table, the audio frames in place of its one placeholder."""
    ids = list(prompt_ids)
    if ids.count(audio_token_id) != 1:
        raise RuntimeUserError(f"the prompt must contain the audio placeholder exactly once (token id {audio_token_id}), not {ids.count(audio_token_id)} times")
    at = ids.index(audio_token_id)
    return np.concatenate([table[ids[:at]], audio.astype(table.dtype), table[ids[at + 1 :]]]).astype(np.float32)


@dataclass
class Transcription:
    name: str
    text: str
    tokens: list[int]
    audio_s: float
    time_to_first_token_s: float
    tokens_per_s: float
    timings: dict[str, float] = field(default_factory=dict)  # encoder_s, prefill_s, decode_s


class LalmRunner:
    """The three parts of an LALM bundle; `transcribe` files or 16 kHz arrays."""

    def __init__(
        self,
        folder: Path,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        table: np.ndarray,
        tokenizer: Any,
        feature_config: dict[str, Any],
        input_kind: str,
        facts: dict[str, Any],
    ) -> None:
        self.folder, self.encoder, self.decoder, self.table = folder, encoder, decoder, table
        self.tokenizer, self.feature_config, self.input_kind, self.facts = tokenizer, feature_config, input_kind, facts
        self.encoder_inputs = [i.name for i in encoder.get_inputs()]
        self.backend = OrtDecoderBackend(decoder, embed=lambda ids: self.table[ids])

    @classmethod
    def from_parts(cls, folder: Path, feature_config: dict[str, Any], input_kind: str, facts: dict[str, Any]) -> LalmRunner:
        """A runner over a bundle still being written (the export's parity gate): its graphs,
        table and tokenizer are in `folder`; the facts come from the exporter, not a manifest."""
        from runtime.manifest import read_tokenizer
        from runtime.sessions import SessionOptions, create_session

        encoder = create_session(folder / "audio_encoder.onnx", SessionOptions(provider="cpu"))
        decoder = create_session(folder / "decoder.onnx", SessionOptions(provider="cpu"))
        table = np.load(folder / "embed_tokens.npy", allow_pickle=False)
        return cls(folder, encoder, decoder, table, read_tokenizer(folder), feature_config, input_kind, facts)

    # --- the parts ----------------------------------------------------------------------

    def audio_features(self, samples: np.ndarray) -> np.ndarray:
        """One clip's projected frames `(frames, hidden)`, padding cut."""
        features = features_for(self.input_kind, samples, self.feature_config)[None].astype(np.float32)
        feeds = {self.encoder_inputs[0]: features, "audio_lengths": np.array([len(samples)], dtype=np.int64)}
        projected, lengths = self.encoder.run(["audio_features", "audio_feature_lengths"], feeds)
        return projected[0, : int(lengths[0])]

    def prompt_ids(self, prompt: str, tokenizer: Any | None = None) -> list[int]:
        tokenizer = tokenizer or self.tokenizer
        encoded = tokenizer.encode(prompt)
        return list(encoded.ids if hasattr(encoded, "ids") else encoded)

    def tokens_for(
        self, features: np.ndarray, prompt: str, options: GenerationOptions, tokenizer: Any | None = None, on_step: Callable | None = None
    ) -> np.ndarray:
        """Generated tokens for one clip's frames and a prompt text holding the placeholder."""
        embeds = prompt_embeddings(self.prompt_ids(prompt, tokenizer), int(self.facts["audio_token_id"]), self.table, features)[None]
        context = int(self.facts.get("context_length") or 1 << 30)
        if embeds.shape[1] + options.max_new_tokens > context:
            raise ContextLengthError(embeds.shape[1], options.max_new_tokens, context)
        ones = np.ones((1, embeds.shape[1]), dtype=np.int64)
        return generate(PromptEmbeds(self.backend, embeds), ones * 0, ones, options, on_step=on_step)[0]

    # --- the whole ----------------------------------------------------------------------

    def transcribe(
        self,
        clips: Sequence[str | Path | np.ndarray],
        prompt: str | None = None,
        options: GenerationOptions | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> list[Transcription]:
        """Text for each file or 16 kHz array, one clip at a time (padding never enters);
        `on_text` streams the first clip's text."""
        if not clips:
            raise RuntimeUserError("no audio given; pass at least one file or array")
        prompt = self.facts["prompt"] if prompt is None else prompt
        if self.facts["audio_token"] not in prompt:
            raise RuntimeUserError(f"the prompt must contain the audio placeholder {self.facts['audio_token']!r} where the audio goes")
        options = options or GenerationOptions()
        if options.eos_token_id is None:
            options = replace(options, eos_token_id=self.facts.get("eos_token_id"))
        audios = [clip_audio(clip, index) for index, clip in enumerate(clips)]
        return [self._transcribe_one(audio, prompt, options, on_text if index == 0 else None) for index, audio in enumerate(audios)]

    def _transcribe_one(self, audio: Audio, prompt: str, options: GenerationOptions, on_text: Callable[[str], None] | None) -> Transcription:
        start = time.perf_counter()
        features = self.audio_features(audio.samples)
        encoded = time.perf_counter()
        marks: list[float] = []
        streamed = [""]

        def on_step(tokens: np.ndarray) -> None:
            marks.append(time.perf_counter())
            if on_text is not None:
                text = self.decode(tokens[0], options)
                if len(text) > len(streamed[0]) and text.startswith(streamed[0]):
                    on_text(text[len(streamed[0]) :])
                    streamed[0] = text

        tokens = until_eos(self.tokens_for(features, prompt, options, on_step=on_step), options)
        end = time.perf_counter()
        first = marks[0] if marks else end
        rate = (len(marks) - 1) / (end - first) if len(marks) > 1 and end > first else 0.0
        timings = {"encoder_s": round(encoded - start, 6), "prefill_s": round(first - encoded, 6), "decode_s": round(end - first, 6)}
        return Transcription(audio.name, self.decode(tokens, options), tokens, round(audio.seconds, 3), round(first - start, 6), round(rate, 3), timings)

    def decode(self, tokens: Sequence[int], options: GenerationOptions) -> str:
        kept = until_eos(tokens, options)
        if kept and options.stop_at_eos and kept[-1] == options.eos_token_id:
            kept = kept[:-1]
        return self.tokenizer.decode(kept, skip_special_tokens=True)


def clip_audio(clip: str | Path | np.ndarray, index: int) -> Audio:
    if isinstance(clip, np.ndarray):
        return Audio(f"array{index}", check_samples(clip, f"array{index}"), 16_000)
    return load_audio(clip)


def load_lalm(folder: Path, manifest: Any, options: Any) -> LalmRunner:
    """The runner of an LALM bundle whose manifest is read and whose graphs are verified."""
    from runtime.manifest import read_json_object, read_tokenizer, sha256_of, verify_graph_files
    from runtime.sessions import active_provider, open_bundle_graph

    encoder, decoder = (
        open_bundle_graph(verify_graph_files(folder, manifest.graphs[name]), options, manifest.graphs[name], folder) for name in ("audio_encoder", "decoder")
    )
    embedding = manifest.extra["embedding"]
    table_path = folder / embedding["file"]
    if not table_path.is_file() or sha256_of(table_path) != embedding["sha256"]:
        raise BundleError(f"{table_path} is missing or does not match the sha256 in the manifest; export the bundle again")
    table = np.load(table_path, allow_pickle=False)
    feature_config = read_json_object(folder / "preprocessor_config.json", "bundle file")
    runner = LalmRunner(folder, encoder, decoder, table, read_tokenizer(folder), feature_config, manifest.input_kind, dict(manifest.extra))
    runner.manifest, runner.provider = manifest, active_provider(decoder)
    return runner
