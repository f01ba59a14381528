"""Audio → text with an LALM bundle, torch-free: the audio encoder graph gives each clip's
projected frames, the prompt's token embeddings come from the bundle's token table with the
frames at the placeholder, and the decoder graph generates from those embeddings."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from runtime.audio import Audio, check_feature_config, check_samples, features_for, groups_by_shape, load_audio
from runtime.chat import ChatTemplate
from runtime.errors import BundleError, ContextLengthError, RuntimeUserError
from runtime.flags import PREFILL_POSITIONS_PER_STEP
from runtime.generation import GenerationOptions, PromptEmbeds, StepClock, check_prompt_text, generate, until_eos
from runtime.limits import AudioLimits, audio_limits
from runtime.longform import PIECE_SECONDS, Piece, Recording, Segment, piece_audio, pieces_of, words_to_add
from runtime.manifest import is_whole_number
from runtime.ort_backends import OrtDecoderBackend
from runtime.runners.requests import Budget, Generation, TranscriptionRequest, check_stop_strings, cut_at_stop
from runtime.scheduler import DecodeScheduler
from runtime.sessions import run_options_for
from runtime.vad import SPLITTERS

PROBE_SECONDS = 10.0  # silence run once to learn how many positions a second of audio takes
GENERATION_BATCH = 8  # clips generated together at most (their KV caches grow with the batch)
# A long recording's pieces through the encoder at once: attention memory grows with the batch
# (Whisper-base, 8 windows: +0.8 GB), and on the CPU a batch gains little (compute-bound), so a
# long recording's peak memory stays that of one clip (docs/long-recordings.md).
LONG_ENCODER_BATCH = 1


def placeholder_at(prompt_ids: Sequence[int], audio_token_id: int) -> int:
    """Where the prompt's one audio placeholder is."""
    ids = list(prompt_ids)
    if ids.count(audio_token_id) != 1:
        raise RuntimeUserError(f"the prompt must contain the audio placeholder exactly once (token id {audio_token_id}), not {ids.count(audio_token_id)} times")
    return ids.index(audio_token_id)


def prompt_embeddings(prompt_ids: Sequence[int], audio_token_id: int, table: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """`(positions, hidden)`: the prompt's rows of the token table, the audio frames in place of its one placeholder."""
    ids = list(prompt_ids)
    at = placeholder_at(ids, audio_token_id)
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
    prompt_tokens: int = 0  # positions of the prompt, the audio frames included
    batch_size: int = 1  # clips generated together; prefill_s and decode_s are the batch's
    segments: list[Segment] = field(default_factory=list)  # a long recording's pieces; a clip within the window: itself


class LongTranscript:
    """A long recording's result, built from its pieces' as they finish, in order: the segments,
    the words joined (`runtime.longform.words_to_add`), the tokens, the times added up."""

    def __init__(self, recording: Recording, pieces: Sequence[Piece]) -> None:
        self.recording, self.pieces = recording, pieces
        self.segments: list[Segment] = []
        self.parts: list[Transcription] = []
        self.words: list[str] = []

    def add(self, part: Transcription) -> str:
        """Take the next piece's result; the text it adds to the joined text (empty if none)."""
        piece = self.pieces[len(self.segments)]
        self.segments.append(Segment(len(self.segments), *piece.seconds, part.text.strip(), part.tokens))
        self.parts.append(part)
        new = words_to_add(self.words, part.text, piece)
        added = (" " if self.words and new else "") + " ".join(new)
        self.words += new
        return added

    def result(self) -> Transcription:
        parts = self.parts
        timings = {name: round(sum(part.timings.get(name, 0.0) for part in parts), 6) for name in ("encoder_s", "prefill_s", "decode_s")}
        tokens = [token for part in parts for token in part.tokens]
        return Transcription(
            self.recording.name,
            " ".join(self.words),
            tokens,
            round(self.recording.seconds, 3),
            parts[0].time_to_first_token_s if parts else 0.0,
            round(len(tokens) / timings["decode_s"], 3) if timings["decode_s"] > 0 else 0.0,
            timings,
            sum(part.prompt_tokens for part in parts),
            max((part.batch_size for part in parts), default=1),
            self.segments,
        )


class LalmRunner:
    """The three parts of an LALM bundle; `transcribe` files or 16 kHz arrays."""

    role: ClassVar[str] = "lalm"

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
        manifest: Any = None,
        limits: AudioLimits | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        from runtime.sessions import active_provider

        self.folder, self.encoder, self.decoder, self.table = folder, encoder, decoder, table
        self.tokenizer, self.feature_config, self.input_kind, self.facts = tokenizer, feature_config, input_kind, facts
        self.manifest = manifest  # None for a bundle still being written (the export's parity gate)
        self.limits = limits  # a bundle's clip lengths, from its manifest
        self.chat_template = chat_template  # a checkpoint's chat template, which chat requests are formatted with
        self.encoder_inputs = [i.name for i in encoder.get_inputs()]
        self.provider = active_provider(decoder)
        self.backend = self.new_backend()
        self._probe: tuple[float, float] | None = None  # `audio_positions`, once measured

    @property
    def context_length(self) -> int:
        """The positions the decoder was exported for (as `TextGenerator.context_length`)."""
        return int(self.facts.get("context_length") or 1 << 30)

    @property
    def eos_token_id(self) -> int | None:
        return self.facts.get("eos_token_id")

    @property
    def audio_token(self) -> str:
        """The placeholder a prompt holds where the clip's frames go."""
        return str(self.facts["audio_token"])

    def card_facts(self) -> dict[str, Any]:
        """What a server's model list adds for this bundle: the prompt it was trained with."""
        return {"prompt": self.facts["prompt"]}

    @classmethod
    def from_parts(cls, folder: Path, feature_config: dict[str, Any], input_kind: str, facts: dict[str, Any], provider: str = "cpu") -> LalmRunner:
        """A runner over a bundle still being written (the export's parity gate): its graphs,
        table and tokenizer are in `folder`; the facts come from the exporter, not a manifest."""
        from runtime.manifest import read_tokenizer
        from runtime.sessions import SessionOptions, create_session

        encoder = create_session(folder / "audio_encoder.onnx", SessionOptions(provider=provider))
        decoder = create_session(folder / "decoder.onnx", SessionOptions(provider=provider))
        table = np.load(folder / "embed_tokens.npy", allow_pickle=False)
        return cls(folder, encoder, decoder, table, read_tokenizer(folder), feature_config, input_kind, facts)

    # --- the parts ----------------------------------------------------------------------

    def audio_features(self, samples: np.ndarray) -> np.ndarray:
        """One clip's projected frames `(frames, hidden)`, padding cut."""
        return self.audio_features_batch([samples])[0]

    def audio_features_batch(self, clips: Sequence[np.ndarray], largest: int | None = None, shrink_arena: bool = False) -> list[np.ndarray]:
        """Each clip's projected frames. Clips whose encoder inputs have one shape (Whisper's
        window: all; raw audio: equal lengths) run as one batch (of at most `largest`); others
        alone. The graphs take no attention mask, so padding clips together would change their
        features. `shrink_arena`: memory a batch took goes back after it (a server's batches)."""
        inputs = [features_for(self.input_kind, samples, self.feature_config).astype(np.float32) for samples in clips]
        results: dict[int, np.ndarray] = {}
        for indices in groups_by_shape(inputs, largest):
            feeds = {
                self.encoder_inputs[0]: np.stack([inputs[i] for i in indices]),
                "audio_lengths": np.array([len(clips[i]) for i in indices], dtype=np.int64),
            }
            options = run_options_for(self.input_kind, sum(len(clips[i]) for i in indices), shrink_arena)
            projected, lengths = self.encoder.run(["audio_features", "audio_feature_lengths"], feeds, options)
            for row, index in enumerate(indices):
                results[index] = projected[row, : int(lengths[row])]
        return [results[i] for i in range(len(clips))]

    def encode(self, clips: Sequence[Audio], shrink_arena: bool = False) -> list[np.ndarray]:
        """Each clip's projected frames (a server's encoder batch; `audio_features_batch`)."""
        return self.audio_features_batch([clip.samples for clip in clips], shrink_arena=shrink_arena)

    def new_backend(self) -> OrtDecoderBackend:
        """A decoder backend of its own (KV buffers included) over the shared session: one per
        generation running at the same time as others. Its KV cache lives in buffers on the
        provider's device (IO binding): on CUDA it never crosses to the host."""
        return OrtDecoderBackend(self.decoder, binding_device=self.provider, embed=lambda ids: self.table[ids])

    def new_scheduler(self, on_step: Callable[[int], None] | None = None, prefill_budget: int = PREFILL_POSITIONS_PER_STEP) -> DecodeScheduler:
        """A scheduler whose generations share one decoder call per decode step (a server's)."""
        binding = self.provider if self.provider == "cuda" else None
        return DecodeScheduler(self.decoder, embed=lambda ids: self.table[ids], binding_device=binding, on_step=on_step, prefill_budget=prefill_budget)

    def prompt_ids(self, prompt: str) -> list[int]:
        check_prompt_text(prompt)
        encoded = self.tokenizer.encode(prompt)
        return list(encoded.ids if hasattr(encoded, "ids") else encoded)

    def tokens_for(self, features: np.ndarray, prompt: str, options: GenerationOptions) -> np.ndarray:
        """Generated tokens for one clip's frames and a prompt text holding the placeholder."""
        return self.generate_from(self.prompt_embeds(features, prompt, options), options)[0]

    def generate_from(
        self,
        embeds: np.ndarray,
        options: GenerationOptions,
        on_step: Callable | None = None,
        backend: OrtDecoderBackend | None = None,
        stop: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Generated tokens `(batch, n)` for prompts given as embeddings `(batch, positions, hidden)`,
        all of one length: the decoder graphs take no padding."""
        ones = np.ones(embeds.shape[:2], dtype=np.int64)
        return generate(PromptEmbeds(backend or self.backend, embeds), ones * 0, ones, options, stop=stop, on_step=on_step)

    def prompt_embeds(self, features: np.ndarray, prompt: str, options: GenerationOptions) -> np.ndarray:
        """`(1, positions, hidden)`: the prompt with the clip's frames in place, checked against the context length."""
        embeds = prompt_embeddings(self.prompt_ids(prompt), int(self.facts["audio_token_id"]), self.table, features)[None]
        self._fitting(embeds.shape[1], options)
        return embeds

    def prompt_positions(self, features: np.ndarray, prompt: str, options: GenerationOptions) -> int:
        """`prompt_embeds`' positions and checks, without building the embeddings."""
        ids = self.prompt_ids(prompt)
        placeholder_at(ids, int(self.facts["audio_token_id"]))
        return self._fitting(len(ids) - 1 + len(features), options)

    def _fitting(self, positions: int, options: GenerationOptions) -> int:
        """`positions`, refused when they and `options.max_new_tokens` overflow the context."""
        if positions + options.max_new_tokens > self.context_length:
            raise ContextLengthError(positions, options.max_new_tokens, self.context_length)
        return positions

    # --- the whole ----------------------------------------------------------------------

    def transcribe(
        self,
        clips: Sequence[str | Path | np.ndarray | Audio] | str | Path | np.ndarray | Audio,
        prompt: str | None = None,
        options: GenerationOptions | None = None,
        on_text: Callable[[str], None] | None = None,
        stop_strings: Sequence[str] = (),
        split: str | None = None,
        on_piece: Callable[[str, int, int], None] | None = None,
    ) -> list[Transcription]:
        """Text for each file or 16 kHz array (one alone is a batch of one); `on_text` streams
        the first clip's text, and each ends at the first of `stop_strings`. The encoder runs
        clips of one input shape as a batch, and greedy generation clips with as many frames
        (prompts of one length, so nothing is padded): every clip gets the tokens it gets alone.
        The rest, and sampled generations (whose random draws a batch would share), run one by one.

        A recording longer than the bundle's window is transcribed in pieces cut at its pauses
        (`runtime.longform`; `split`: vad, energy or fixed, default the bundle's), its segments
        in the result; `on_piece(name, done, total)` follows its pieces."""
        if isinstance(clips, str | Path | Audio) or (isinstance(clips, np.ndarray) and clips.ndim == 1):
            clips = [clips]  # one clip, not a sequence of them
        if len(clips) == 0:
            raise RuntimeUserError("no audio given; pass at least one file or array")
        prompt, options = self.resolve(prompt, options)
        check_stop_strings(stop_strings)
        split = self.split_for(split)
        recordings = [self.long_recording(clip, index) for index, clip in enumerate(clips)]
        short = [index for index, recording in enumerate(recordings) if recording is None]
        audios = [clip_audio(clips[index], index, self.limits) for index in short]

        def in_pieces(audio: Audio, streamed: Callable[[str], None] | None) -> Transcription:
            return self.transcribe_recording(Recording.of(audio), prompt, options, split, streamed, stop_strings, on_piece)

        streamed = on_text if short[:1] == [0] else None
        results = dict(zip(short, self.transcribe_clips(audios, prompt, options, streamed, stop_strings, too_long=in_pieces)))
        for index, recording in enumerate(recordings):
            if recording is not None:
                streamed = on_text if index == 0 else None
                results[index] = self.transcribe_recording(recording, prompt, options, split, streamed, stop_strings, on_piece)
        return [results[i] for i in range(len(clips))]

    def transcribe_clips(
        self,
        audios: Sequence[Audio],
        prompt: str,
        options: GenerationOptions,
        on_text: Callable[[str], None] | None,
        stop_strings: Sequence[str],
        encoder_batch: int | None = None,
        too_long: Callable[[Audio, Callable[[str], None] | None], Transcription] | None = None,
    ) -> list[Transcription]:
        """`transcribe` for clips within the window, the prompt resolved; the encoder takes at
        most `encoder_batch` clips at once (default: all of one shape). A clip whose audio
        positions, once encoded, leave the decoder's context no room beside the prompt and the
        new tokens goes to `too_long` (to be cut into pieces), else is refused."""
        if not audios:
            return []
        for audio in audios:
            self.check_length(audio)
        start = time.perf_counter()
        features = self.audio_features_batch([audio.samples for audio in audios], encoder_batch)
        encoder_s = (time.perf_counter() - start) / len(audios)
        results: dict[int, Transcription] = {}
        fitting = []
        for index, feature in enumerate(features):
            try:
                self.prompt_positions(feature, prompt, options)
                fitting.append(index)
            except ContextLengthError:
                if too_long is None:
                    raise
                results[index] = too_long(audios[index], on_text if index == 0 else None)
        for batch_indices in generation_batches([len(features[i]) for i in fitting], options):
            indices = [fitting[i] for i in batch_indices]
            streamed = on_text if indices[0] == 0 else None
            batch = self.transcribe_batch(
                [audios[i] for i in indices], [features[i] for i in indices], encoder_s, prompt, options, streamed, stop_strings=stop_strings
            )
            results.update(zip(indices, batch))
        return [results[i] for i in range(len(audios))]

    def split_for(self, split: str | None) -> str:
        """The splitter of long recordings: `split`, else the one the bundle records, else vad."""
        chosen = split or self.facts.get("split") or "vad"
        if chosen not in SPLITTERS:
            raise RuntimeUserError(f"split must be one of {', '.join(SPLITTERS)}, not {chosen!r}")
        return chosen

    def long_recording(self, clip: str | Path | bytes | np.ndarray | Audio, index: int, name: str | None = None) -> Recording | None:
        """`clip` (a file, its bytes, an array, an `Audio`) as a `Recording` when it is longer
        than the bundle's window (a file: by its header, before any decoding), else None."""
        if self.limits is None:
            return None
        if isinstance(clip, Audio | np.ndarray):
            samples = clip.samples if isinstance(clip, Audio) else clip
            return Recording.of(clip, f"array{index}") if len(samples) / 16_000 > self.limits.max_seconds else None
        recording = Recording.of(clip, name)
        return recording if recording.seconds > self.limits.max_seconds else None

    def seconds_that_fit(self, prompt: str, options: GenerationOptions, longest: float) -> float:
        """The longest clip, up to `longest` seconds, whose audio positions fit the decoder's
        context beside the prompt and the new tokens (refused when not even a short one does)."""
        other = len(self.prompt_ids(prompt)) - 1
        room = self.context_length - other - options.max_new_tokens
        fixed, per_second = self.audio_positions()
        if math.ceil(fixed + per_second * longest) + 1 <= room:
            return longest
        fitting = (room - 2 - fixed) / per_second if per_second > 0 else 0.0
        if fitting < 0.1:
            raise ContextLengthError(other + math.ceil(fixed + per_second * longest), options.max_new_tokens, self.context_length)
        return fitting

    def audio_positions(self) -> tuple[float, float]:
        """The decoder positions of a clip as (fixed, per second): from two encoder runs on
        silence (made once). Most projectors give positions in proportion to the audio (padding
        cut); a tower that always gives its whole window's has none per second."""
        if self._probe is None:
            long = min(PROBE_SECONDS, self.limits.max_seconds)
            counts = [len(self.audio_features(np.zeros(int(seconds * 16_000), np.float32))) for seconds in (long / 2, long)]
            per_second = (counts[1] - counts[0]) / (long / 2)
            self._probe = (counts[1] - per_second * long, per_second)
        return self._probe

    def piece_seconds(self, prompt: str, options: GenerationOptions) -> float:
        """The longest piece of a long recording: the window (at most PIECE_SECONDS), shorter where
        its audio positions, the prompt and the new tokens would overflow the decoder's context."""
        return self.seconds_that_fit(prompt, options, min(self.limits.max_seconds, PIECE_SECONDS))

    def transcribe_recording(
        self,
        recording: Recording,
        prompt: str,
        options: GenerationOptions,
        split: str,
        on_text: Callable[[str], None] | None = None,
        stop_strings: Sequence[str] = (),
        on_piece: Callable[[str, int, int], None] | None = None,
    ) -> Transcription:
        """A long recording's text and segments: its pieces (`runtime.longform`) transcribed a
        batch at a time, each piece read from the recording when its batch runs."""
        pieces = [piece for piece in pieces_of(recording, split, self.piece_seconds(prompt, options)) if piece.end - piece.start >= self.limits.min_samples]
        transcript = LongTranscript(recording, pieces)
        if on_piece is not None:
            on_piece(recording.name, 0, len(pieces))
        for at in range(0, len(pieces), GENERATION_BATCH):
            audios = [piece_audio(recording, piece) for piece in pieces[at : at + GENERATION_BATCH]]
            for part in self.transcribe_clips(audios, prompt, options, None, stop_strings, LONG_ENCODER_BATCH):
                added = transcript.add(part)
                if on_text is not None and added:
                    on_text(added)
            if on_piece is not None:
                on_piece(recording.name, len(transcript.segments), len(pieces))
        return transcript.result()

    def check_length(self, audio: Audio) -> None:
        """Refuse a clip shorter than the encoder's receptive field or longer than its window
        (a log-mel front end would cut it off silently)."""
        if self.limits is not None:
            self.limits.check(audio)

    def instruction_prompt(self, text: str | None) -> str | None:
        """A user's prompt text as the bundle runs it (`runtime.infer --prompt`, runtime.batch,
        a transcription's `prompt`): None keeps the bundle's prompt; text holding the placeholder
        is the whole prompt; other text is the instruction after the audio, in a user turn of the
        checkpoint's chat template where the bundle has one."""
        if text is None:
            return None
        token = self.facts["audio_token"]
        if token in text:
            return text
        if self.chat_template is not None:
            return self.chat_template.render([{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": text}]}])
        return token + text

    def resolve(self, prompt: str | None, options: GenerationOptions | None) -> tuple[str, GenerationOptions]:
        """The prompt as the bundle runs it (the bundle's own when None, else `instruction_prompt`'s
        rule, the same through every door) and options with the bundle's EOS."""
        if prompt is not None:
            check_prompt_text(prompt)
        prompt = self.facts["prompt"] if prompt is None else self.instruction_prompt(prompt)
        options = options or GenerationOptions()
        options.validate()
        if options.eos_token_id is None:
            options = replace(options, eos_token_id=self.eos_token_id)
        return prompt, options

    def prepare(self, request: TranscriptionRequest, frames: np.ndarray, encoder_s: float = 0.0, budget: Budget | None = None) -> Generation:
        """`request` with its clip's projected `frames` (`encode`, which took `encoder_s`), made
        ready to generate: the prompt rule applied, the bundle's EOS, the prompt checked to fit
        the context with the token budget (`budget(positions)` when given, else the options')."""
        prompt, options = self.resolve(request.prompt, request.options)
        positions = self.prompt_positions(frames, prompt, options)
        if budget is not None:
            options = replace(options, max_new_tokens=budget(positions))

        def run(backend: OrtDecoderBackend, on_text: Callable[[str], None] | None = None, cancelled: Callable[[], bool] | None = None) -> Transcription:
            return self.transcribe_batch([request.audio], [frames], encoder_s, prompt, options, on_text, backend, cancelled, request.stop)[0]

        return Generation(positions, options, run)

    def transcribe_batch(
        self,
        audios: Sequence[Audio],
        features: Sequence[np.ndarray],
        encoder_s: float,
        prompt: str,
        options: GenerationOptions,
        on_text: Callable[[str], None] | None = None,
        backend: OrtDecoderBackend | None = None,
        cancelled: Callable[[], bool] | None = None,
        stop_strings: Sequence[str] = (),
    ) -> list[Transcription]:
        """The clips' texts, generated as one batch: their frames must be equally many (the
        prompts one length). `on_text` streams the first clip's text; a clip's generation ends
        at its EOS or at the first of `stop_strings`, the batch's when every clip's has."""
        clock = StepClock(lambda row: cut_at_stop(self.decode(row, options), stop_strings), on_text, cancelled)
        ends: dict[int, int] = {}  # row -> its token count when a stop string first completed (where it ends alone)

        def stop(tokens: np.ndarray) -> np.ndarray:
            hit = np.array([any(s in self.decode(row, options) for s in stop_strings) for row in tokens], dtype=bool)
            for row in np.flatnonzero(hit):
                ends.setdefault(int(row), tokens.shape[1])
            return hit

        start = time.perf_counter()
        embeds = np.concatenate([self.prompt_embeds(feature, prompt, options) for feature in features])
        generated = self.generate_from(embeds, options, clock, backend, stop if stop_strings else None)
        end = time.perf_counter()
        first = clock.first(end)
        timings = {"encoder_s": round(encoder_s, 6), "prefill_s": round(first - start, 6), "decode_s": round(end - first, 6)}
        results = []
        for index, (audio, row) in enumerate(zip(audios, generated)):
            tokens = until_eos(row, options)[: ends.get(index)]  # the rest pads the row to the batch's length
            results.append(
                Transcription(
                    audio.name,
                    cut_at_stop(self.decode(tokens, options), stop_strings),
                    tokens,
                    round(audio.seconds, 3),
                    round(encoder_s + first - start, 6),
                    round(clock.tokens_per_s(end), 3),
                    timings,
                    int(embeds.shape[1]),
                    len(audios),
                )
            )
            results[-1].segments = [Segment(0, 0.0, results[-1].audio_s, results[-1].text.strip(), tokens)]
        clock.finish(results[0].text)
        return results

    def decode(self, tokens: Sequence[int], options: GenerationOptions) -> str:
        kept = until_eos(tokens, options)
        if kept and options.stop_at_eos and kept[-1] == options.eos_token_id:
            kept = kept[:-1]
        return self.tokenizer.decode(kept, skip_special_tokens=True)


def generation_batches(frames: Sequence[int], options: GenerationOptions, largest: int = GENERATION_BATCH) -> list[list[int]]:
    """Indices of clips to generate together: greedy generations of clips with as many frames
    (in order, at most `largest` at once); sampled ones alone, each drawing as it would alone."""
    if options.temperature > 0:
        return [[index] for index in range(len(frames))]
    groups: dict[int, list[int]] = {}
    for index, count in enumerate(frames):
        groups.setdefault(count, []).append(index)
    return [indices[at : at + largest] for indices in groups.values() for at in range(0, len(indices), largest)]


def clip_audio(clip: str | Path | np.ndarray | Audio, index: int, limits: AudioLimits | None = None) -> Audio:
    """A clip given as a file (refused by its header past `limits`), a 16 kHz array or an `Audio`."""
    if isinstance(clip, Audio):
        return clip
    if isinstance(clip, np.ndarray):
        return Audio(f"array{index}", check_samples(clip, f"array{index}"), 16_000)
    return load_audio(clip, limits)


def load_lalm(folder: Path, manifest: Any, options: Any) -> LalmRunner:
    """The runner of an LALM bundle whose manifest is read and whose graphs are verified."""
    from runtime.manifest import read_json_object, read_tokenizer, sha256_of, verify_graph_files
    from runtime.sessions import open_bundle_graph

    check_lalm_facts(manifest.extra, folder)  # before the sessions: a hand-edited manifest fails in a moment
    encoder, decoder = (
        open_bundle_graph(verify_graph_files(folder, manifest.graphs[name]), options, manifest.graphs[name], folder) for name in ("audio_encoder", "decoder")
    )
    embedding = manifest.extra["embedding"]
    table_path = folder / embedding["file"]
    if not table_path.is_file() or sha256_of(table_path) != embedding["sha256"]:
        raise BundleError(f"{table_path} is missing or does not match the sha256 in the manifest; export the bundle again")
    table = np.load(table_path, allow_pickle=False)
    if list(table.shape) != list(embedding["shape"]):
        raise BundleError(f"{table_path} has shape {list(table.shape)}, the manifest {embedding['shape']}; export the bundle again")
    feature_config = read_json_object(folder / "preprocessor_config.json", "bundle file")
    check_feature_config(feature_config, manifest.input_kind, str(folder / "preprocessor_config.json"))
    return LalmRunner(
        folder,
        encoder,
        decoder,
        table,
        read_tokenizer(folder),
        feature_config,
        manifest.input_kind,
        dict(manifest.extra),
        manifest=manifest,
        limits=audio_limits(manifest, folder, options.max_clip_memory_gb),
        chat_template=read_chat_template(folder, manifest.extra),
    )


def read_chat_template(folder: Path, extra: dict[str, Any]) -> ChatTemplate | None:
    """The chat template the manifest names (`extra.chat_template`, a file of the bundle), if any,
    and the content form it reads (`extra.chat_content`)."""
    name = extra.get("chat_template")
    if name is None:
        return None
    path = folder / str(name)
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise BundleError(f"{folder / 'manifest.json'}: extra.chat_template names {name!r}, which is not a file of the bundle; export it again")
    content = extra.get("chat_content", "parts")
    if content not in ("parts", "text"):
        raise BundleError(f'{folder / "manifest.json"}: extra.chat_content is {content!r}, not "parts" or "text"; export it again')
    return ChatTemplate(path.read_text(encoding="utf-8"), str(extra["audio_token"]), text_content=content == "text")


MAX_CONTEXT = 1 << 20  # positions: past any decoder lalm-export writes, short of an allocation that fails


def check_lalm_facts(extra: dict[str, Any], folder: Path) -> None:
    """The manifest fields an LALM bundle runs on, refused in one line (BundleError) when a
    hand edit removed them or put them out of range."""
    where = f"{folder / 'manifest.json'}: extra"
    embedding = extra.get("embedding")
    if (
        not isinstance(embedding, dict)
        or not all(isinstance(embedding.get(k), str) for k in ("file", "sha256"))
        or not isinstance(embedding.get("shape"), list)
    ):
        raise BundleError(f"{where}.embedding must name the token table (file, sha256, shape); export the bundle again")
    whole = {"audio_token_id": (0, None), "context_length": (1, MAX_CONTEXT), "downsample": (1, 1 << 10)}
    for name, (low, high) in whole.items():
        value = extra.get(name)
        if name == "downsample" and name not in extra:  # a projector of the user's own (no fixed downsampling)
            continue
        if not is_whole_number(value, low, high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise BundleError(f"{where}.{name} is {value!r}, not a whole number {span}; export the bundle again")
    for name in ("prompt", "audio_token"):
        if not isinstance(extra.get(name), str):
            raise BundleError(f"{where}.{name} must be text; export the bundle again")
