"""The models a server holds and the work it does on them: admission (a bounded number of
requests in flight), batched audio encoding, and generations whose decode steps run as one
batch (continuous batching, `runtime.scheduler`). The HTTP layer (`runtime.server.app`) and
Ray Serve (`runtime.server.ray_serve`) share it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.audio import Audio, decode_audio
from runtime.errors import ContextLengthError, RuntimeUserError
from runtime.flags import PREFILL_POSITIONS_PER_STEP
from runtime.generation import GenerationOptions
from runtime.longform import Piece, Recording, piece_audio, pieces_of
from runtime.runners import load
from runtime.runners.decoder import TextGenerator
from runtime.runners.encoder import EncodedAudio, EncoderRunner
from runtime.runners.lalm import LalmRunner, LongTranscript, Transcription
from runtime.runners.requests import CompletionRequest, Generation, TranscriptionRequest
from runtime.scheduler import DecodeScheduler
from runtime.server.batching import DynamicBatcher
from runtime.server.errors import ApiError, as_api_error, from_user_error, unavailable
from runtime.server.memory import return_freed_memory
from runtime.server.metrics import ServerMetrics
from runtime.sessions import SessionOptions

PIECE_TOKENS = 128  # a long recording's tokens per piece when neither the request nor --max-new-tokens says


@dataclass(frozen=True)
class ServeSettings:
    max_batch_size: int = 8  # clips per encoder batch
    max_batch_wait_ms: float = 2.0  # how long the first clip of a batch waits for others (under load, batches form while one runs)
    max_queue: int = 64  # requests admitted and not finished; more get 503
    decode_slots: int = 16  # generations running at once: the rows of the shared decode batch
    prefill_budget: int = PREFILL_POSITIONS_PER_STEP  # prompt positions prefilled between two decode steps
    request_timeout_s: float = 300.0
    max_body_mb: float = 25.0
    max_new_tokens: int | None = None  # a cap for requests that do not say; None: the rest of the context
    retry_after_s: int = 1

    def validate(self) -> None:
        for name in ("max_batch_size", "max_queue", "decode_slots", "prefill_budget", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RuntimeUserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        for name in ("max_batch_wait_ms", "request_timeout_s", "max_body_mb"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf") or (name != "max_batch_wait_ms" and value == 0):
                raise RuntimeUserError(f"--{name.replace('_', '-')} must be a positive number, not {value}")


class ServedModel:
    """One bundle under its model id; a generating one with the scheduler its generations share."""

    def __init__(self, name: str, runner: EncoderRunner | TextGenerator | LalmRunner) -> None:
        self.name, self.runner = name, runner
        self.manifest = runner.manifest
        self.kind = runner.role
        self.created = int(time.time())
        self.decode_batch_sizes: list[Callable[[int], None]] = []  # told the rows of every decode step
        self.prefill_budget = PREFILL_POSITIONS_PER_STEP  # the engine's --prefill-budget
        self._scheduler: DecodeScheduler | None = None

    @property
    def scheduler(self) -> DecodeScheduler:
        """The scheduler the model's generations share, made at the first (on the event loop's
        thread, so never twice)."""
        if self._scheduler is None:
            self._scheduler = self.runner.new_scheduler(on_step=self._observe_step, prefill_budget=self.prefill_budget)
        return self._scheduler

    def _observe_step(self, rows: int) -> None:
        for observe in self.decode_batch_sizes:
            observe(rows)

    def card(self) -> dict[str, Any]:
        """The model's entry in /v1/models: OpenAI's fields, then what a caller needs to pick one."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "lalm-export",
            "role": self.kind,
            "family": self.manifest.family,
            "precision": self.manifest.precision,
            "provider": self.runner.provider,
            **self.runner.card_facts(),
        }


def load_models(bundles: Sequence[Path], names: Sequence[str] | None, options: SessionOptions) -> dict[str, ServedModel]:
    """Every bundle's sessions, created before the server listens (a bad bundle stops start-up with its one-line error)."""
    names = list(names or [])
    if names and len(names) != len(bundles):
        raise RuntimeUserError(f"--name was given {len(names)} times for {len(bundles)} bundles; give one name per bundle or none")
    ids = names or [Path(b).resolve().name for b in bundles]
    if len(set(ids)) != len(ids):
        raise RuntimeUserError(f"two bundles would serve under one model id ({', '.join(ids)}); give each a --name")
    return {name: ServedModel(name, load(folder, options)) for name, folder in zip(ids, bundles)}


@dataclass
class AudioJob:
    model: ServedModel
    audio: Audio


AudioBatch = Callable[[AudioJob], Awaitable[Any]]


class Engine:
    def __init__(self, models: dict[str, ServedModel], settings: ServeSettings, audio_batch: AudioBatch | None = None) -> None:
        settings.validate()
        self.models, self.settings = models, settings
        self.metrics = ServerMetrics()
        for model in models.values():
            model.decode_batch_sizes.append(self.metrics.decode_batch_size.labels(model.name).observe)
            model.prefill_budget = settings.prefill_budget
        self.pending = 0
        self.draining = False
        # Generation threads plus one for encoder batches: a batch never waits for a free generation thread.
        self.executor = ThreadPoolExecutor(max_workers=settings.decode_slots + 1, thread_name_prefix="lalm-serve")
        self._slots = asyncio.BoundedSemaphore(settings.decode_slots)
        if audio_batch is None:
            audio_batch = DynamicBatcher(self.run_audio_jobs, settings.max_batch_size, settings.max_batch_wait_ms / 1000, self.executor).submit
        self._audio_batch = audio_batch

    def close(self) -> None:
        """Stop the engine's threads once the server has stopped (work still queued is dropped)."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- admission ----------------------------------------------------------------------

    def admit(self) -> Callable[[], None]:
        """Count a request in flight and return what ends it (call it once); 503 with
        Retry-After when `max_queue` are in flight, or when the server is shutting down."""
        if self.draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise unavailable("the server is shutting down; retry on another replica or after it restarts", self.settings.retry_after_s, "server_shutting_down")
        if self.pending >= self.settings.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise unavailable(
                f"the server has {self.pending} requests in flight, its limit (--max-queue {self.settings.max_queue}); retry after a moment",
                self.settings.retry_after_s,
                "queue_full",
            )
        self.pending += 1
        self.metrics.queue_depth.set(self.pending)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.pending -= 1
                self.metrics.queue_depth.set(self.pending)
                if self.pending == 0:  # idle: what the busy moment freed goes back to the system
                    return_freed_memory()

        return release

    @contextmanager
    def admission(self) -> Iterator[None]:
        release = self.admit()
        try:
            yield
        finally:
            release()

    def budgeted(self, model: ServedModel, prompt_positions: int, asked: int | None) -> int:
        """The tokens a generation may make: what the request asked for, else the rest of the
        decoder's context after the prompt (vLLM's rule), capped by --max-new-tokens when the
        server sets one. A prompt that fills the context gets 1, which its check refuses."""
        if asked is not None:
            return asked
        rest = max(1, model.runner.context_length - prompt_positions)
        return min(rest, self.settings.max_new_tokens) if self.settings.max_new_tokens else rest

    def model(self, name: object, kinds: tuple[str, ...], endpoint: str) -> ServedModel:
        if not isinstance(name, str) or not name:
            raise ApiError(400, "the request names no model; pass `model` (GET /v1/models lists them)", param="model")
        if name not in self.models:
            raise ApiError(404, f"the model {name!r} does not exist; served: {', '.join(self.models)}", param="model", code="model_not_found")
        model = self.models[name]
        if model.kind not in kinds:
            raise ApiError(400, f"{name} is an {model.kind} bundle; {endpoint} takes {' or '.join(kinds)} bundles", param="model", code="wrong_model_type")
        return model

    # --- audio: batched -----------------------------------------------------------------

    async def encode(self, model: ServedModel, audio: Audio) -> EncodedAudio | np.ndarray:
        """An encoder bundle's hidden states, or an LALM bundle's projected frames, through the batcher."""
        as_api_error(lambda: model.runner.check_length(audio))  # refused before it can join a batch
        return await self._with_timeout(self._audio_batch(AudioJob(model, audio)), None)

    def run_audio_jobs(self, jobs: Sequence[AudioJob]) -> list[Any]:
        """One batch: each model's clips together (the runners group equal input shapes), a
        result or a user error per job; a failing group is retried clip by clip so only the bad clip fails."""
        results: dict[int, Any] = {}
        by_model: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            by_model.setdefault(job.model.name, []).append(index)
        for indices in by_model.values():
            model = jobs[indices[0]].model
            self.metrics.batch_size.labels(model.name).observe(len(indices))
            try:
                # a batch's arena goes back after it: 8 Whisper-base windows hold 0.8 GB for good otherwise
                outputs = model.runner.encode([jobs[i].audio for i in indices], shrink_arena=len(indices) > 1)
            except Exception:
                outputs = [self._encode_one(model, jobs[i].audio) for i in indices]
            results.update(zip(indices, outputs))
        return [results[i] for i in range(len(jobs))]

    def _encode_one(self, model: ServedModel, clip: Audio) -> Any:
        try:
            return model.runner.encode([clip])[0]
        except RuntimeUserError as err:
            return from_user_error(err)
        except Exception as err:
            return ApiError(500, f"encoding {clip.name} failed: {err}", type="server_error")

    # --- generation: continuously batched ------------------------------------------------

    async def generate(self, model: ServedModel, generation: Generation, on_text: Callable[[str], None] | None = None) -> Any:
        """Run `generation` in a generation thread on a backend whose decode steps run in one
        batch with every other generation's (up to --decode-slots rows); `on_text` is told its
        text as it comes. A timeout, or the caller going away, cancels it: it ends at its next step.
        A generation waits for its slot on the event loop, not in a thread, so waiting ones never
        hold the thread an encoder batch needs; the slot is freed when its thread ends."""
        cancel = threading.Event()
        scheduler, loop = model.scheduler, asyncio.get_running_loop()

        def run() -> Any:
            if cancel.is_set():
                return None
            backend = scheduler.member()
            try:
                return generation.run(backend, on_text, cancel.is_set)
            finally:
                backend.leave()

        def free_the_slot(_: Future) -> None:  # the thread has ended, or was cancelled before it began
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._slots.release)

        async def in_a_slot() -> Any:
            await self._slots.acquire()
            try:
                future = self.executor.submit(run)
            except BaseException:
                self._slots.release()
                raise
            future.add_done_callback(free_the_slot)
            return await asyncio.wrap_future(future)

        return await self._with_timeout(in_a_slot(), cancel)

    async def _with_timeout(self, awaitable: Awaitable[Any], cancel: threading.Event | None) -> Any:
        try:
            return await asyncio.wait_for(_guarded(awaitable), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than the server's limit of {self.settings.request_timeout_s:g} s", type="timeout") from None
        finally:
            if cancel is not None:
                cancel.set()

    async def prepare(
        self, model: ServedModel, request: CompletionRequest | TranscriptionRequest, asked: int | None, too_long_is_none: bool = False
    ) -> Generation | None:
        """A request made ready to generate (a 400 before any event is sent): a transcription's
        clip encoded (batched with other requests' clips), the prompt checked to fit, the token
        budget set (`budgeted`). `too_long_is_none`: a clip whose audio positions leave the
        decoder's context no room gives None (to be cut into pieces) instead of a 400."""

        def budget(positions: int) -> int:
            return self.budgeted(model, positions, asked)

        if isinstance(request, CompletionRequest):
            return as_api_error(lambda: model.runner.prepare(request, budget=budget))
        start = time.perf_counter()
        frames = await self.encode(model, request.audio)
        encoder_s = time.perf_counter() - start

        def prepared() -> Generation | None:
            try:
                return model.runner.prepare(request, frames, encoder_s, budget)
            except ContextLengthError:
                if too_long_is_none:
                    return None
                raise

        return as_api_error(prepared)

    async def transcription(
        self, model: ServedModel, data: bytes, name: str, prompt: str | None, options: GenerationOptions, asked: int | None, split: str | None
    ) -> Callable[[Callable[[str], None] | None], Awaitable[Transcription]]:
        """An uploaded audio file made ready to transcribe (a 400 before any event is sent): the
        work that does it, told its text as it comes. A recording longer than the window (by its
        header), or a clip whose audio positions leave the decoder's context no room, is cut into
        pieces (`transcribe_recording`); any other clip runs as one generation, encoded now."""
        runner = model.runner
        recording = as_api_error(lambda: runner.long_recording(data, 0, name), "file")
        if recording is None:
            audio = as_api_error(lambda: decode_audio(data, name, runner.limits), "file")
            request = as_api_error(lambda: TranscriptionRequest(audio, prompt, options))
            generation = await self.prepare(model, request, asked, too_long_is_none=True)
            if generation is not None:
                return lambda on_text: self.generate(model, generation, on_text)
            recording = Recording.of(audio)
        return lambda on_text: self.transcribe_recording(model, recording, prompt, options, asked, split, on_text)

    def piece_budget(self, asked: int | None) -> int:
        """The tokens each piece of a long recording may make: what the request asked for, else
        --max-new-tokens, else PIECE_TOKENS."""
        return asked or self.settings.max_new_tokens or PIECE_TOKENS

    async def transcribe_recording(
        self,
        model: ServedModel,
        recording: Recording,
        prompt: str | None,
        options: GenerationOptions,
        asked: int | None,
        split: str | None,
        on_text: Callable[[str], None] | None = None,
    ) -> Transcription:
        """A recording longer than the window, as `LalmRunner.transcribe` does it, its pieces
        run as requests of their own: encoded in the batches other clips form, generated in the
        shared decode batch, at most --max-batch-size pieces of it at once (their audio read from
        the upload only then); `on_text` is told each piece's text in order. Each piece may make
        `asked` tokens, else --max-new-tokens, else PIECE_TOKENS."""
        runner = model.runner
        options = replace(options, max_new_tokens=self.piece_budget(asked))
        split = as_api_error(lambda: runner.split_for(split))
        resolved, _ = as_api_error(lambda: runner.resolve(prompt, options))  # refused before any piece is cut

        def plan() -> list[Piece]:
            longest = runner.piece_seconds(resolved, options)
            return [piece for piece in pieces_of(recording, split, longest) if piece.end - piece.start >= runner.limits.min_samples]

        pieces = await asyncio.to_thread(lambda: as_api_error(plan, "file"))
        # An encoder batch's worth of pieces at once: 16 (the decode slots) took the base audio LLM's
        # server to 4.9 GB and 8 to 3.3 GB, and 8 finished sooner on 2 cores (docs/long-recordings.md)
        in_flight = asyncio.Semaphore(min(self.settings.decode_slots, self.settings.max_batch_size))

        async def transcribed(piece: Piece) -> Transcription:
            async with in_flight:
                audio = await asyncio.to_thread(piece_audio, recording, piece)
                generation = await self.prepare(model, TranscriptionRequest(audio, prompt, options), options.max_new_tokens)
                return await self.generate(model, generation)

        tasks = [asyncio.ensure_future(transcribed(piece)) for piece in pieces]
        transcript = LongTranscript(recording, pieces)
        try:
            for task in tasks:  # in order, as they finish
                added = transcript.add(await task)
                if on_text is not None and added:
                    on_text(added)
        finally:
            for task in tasks:
                task.cancel()
        return transcript.result()

    def record_generation(self, model: ServedModel, tokens: int, ttft_s: float, tokens_per_s: float) -> None:
        self.metrics.tokens.labels(model.name).inc(tokens)
        self.metrics.ttft.labels(model.name).observe(ttft_s)
        if tokens_per_s > 0:
            self.metrics.tokens_per_s.labels(model.name).observe(tokens_per_s)


async def _guarded(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except RuntimeUserError as err:
        raise from_user_error(err) from None
