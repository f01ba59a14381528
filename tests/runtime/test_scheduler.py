"""Continuous batching (`runtime.scheduler`): generations that join and leave the shared
decode batch at different steps, with prompts of different lengths, get the tokens they get
alone, on both decoder graphs (fused, Optimum's), on ids and on embeddings (an LALM), with
the cache on the host and through IO binding.

The interleaving is made deterministic by the generations' own step callback: the first
(long) generation starts the k-th request at its step k + 1 and waits until that request has
produced its first token, so request k joins the batch at a known step."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lalm_export.export.component import ExportOptions, export_bundle
from runtime.api import load
from runtime.audio import load_audio
from runtime.generation import GenerationCancelled, GenerationOptions, generate
from runtime.scheduler import DecodeScheduler
from runtime.sessions import SessionOptions

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()


@dataclass(frozen=True)
class Request:
    words: int  # prompt length
    tokens: int  # tokens to generate (EOS ignored, so every length is known)
    starts_at: int | None  # the first request's step at which it starts (None: the first request)
    seed: int | None = None  # sampled at temperature 0.8 with this seed; None: greedy
    cancel_after: int | None = None  # the generation is cancelled after this many tokens

    @property
    def options(self) -> GenerationOptions:
        sampled = {"temperature": 0.8, "seed": self.seed} if self.seed is not None else {}
        return GenerationOptions(max_new_tokens=self.tokens, stop_at_eos=False, **sampled)


# Ten requests: seven join one step after another (eight rows at once), two after several have left;
# one is cancelled mid-way; two sample with a seed of their own.
REQUESTS = [
    Request(3, 40, None),
    Request(9, 12, 2),
    Request(1, 9, 3, seed=11),
    Request(14, 20, 4),
    Request(5, 8, 5),
    Request(7, 15, 6, cancel_after=5),
    Request(2, 10, 7, seed=12),
    Request(11, 30, 8),
    Request(4, 6, 22),
    Request(8, 11, 26),
]

Run = Callable[[object, Request, Callable[[], bool]], list[int]]


def interleaved(scheduler: DecodeScheduler, run: Run) -> dict[int, list[int]]:
    """Each request's tokens through `scheduler`, the requests joining at their `starts_at`."""
    first_token = [threading.Event() for _ in REQUESTS]
    results: dict[int, list[int] | BaseException] = {}
    threads: list[threading.Thread] = []

    def start(index: int) -> None:
        threads.append(threading.Thread(target=generate, args=(index,)))
        threads[-1].start()

    def generate(index: int) -> None:
        request, steps = REQUESTS[index], [0]

        def on_step() -> bool:  # StepClock calls it after every token, before the next decode step
            steps[0] += 1
            first_token[index].set()
            for later, other in enumerate(REQUESTS):
                if index == 0 and other.starts_at == steps[0]:
                    start(later)
                    assert first_token[later].wait(120), f"request {later} did not start"
            return request.cancel_after is not None and steps[0] > request.cancel_after

        backend = scheduler.member()
        try:
            results[index] = run(backend, request, on_step)
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            results[index] = err
        finally:
            backend.leave()

    start(0)
    while any(thread.is_alive() for thread in list(threads)):  # the first starts the others
        for thread in list(threads):
            thread.join()
    return results


def check_interleaved(scheduler: DecodeScheduler, sizes: list[int], run: Run, alone: Callable[[Request], list[int]]) -> None:
    results = interleaved(scheduler, run)
    for index, request in enumerate(REQUESTS):
        if request.cancel_after is not None:
            assert isinstance(results[index], GenerationCancelled)
        else:
            assert results[index] == alone(request), f"request {index} ({request}) differs from its run alone"
    assert max(sizes) == 8  # the seven joined the first one's batch
    assert len(sizes) == scheduler.steps < sum(sizes)  # fewer decoder calls than tokens: the steps were shared
    assert scheduler.rows == 0  # every generation left, the cancelled one too


@pytest.fixture(scope="module")
def decoders(checkpoints, serve_bundles, tmp_path_factory) -> dict[str, Path]:
    optimum = tmp_path_factory.mktemp("scheduler") / "optimum"
    export_bundle(ExportOptions(family="llm", model=str(checkpoints["llm"]), output=optimum, decoder_graph="optimum"), quiet=True)
    return {"fused": serve_bundles["llm"], "optimum": optimum}


def prompt_of(request: Request) -> str:
    return " ".join(WORDS[: request.words])


@pytest.mark.parametrize(("graph", "binding"), [("fused", None), ("optimum", None), ("fused", "cpu"), ("optimum", "cpu")])
def test_interleaved_completions_equal_their_runs_alone(decoders, graph, binding):
    generator = load(decoders[graph], SessionOptions(provider="cpu"))
    assert generator.manifest.extra["decoder_graph"] == graph
    sizes: list[int] = []
    scheduler = DecodeScheduler(generator.session, binding_device=binding, on_step=sizes.append)
    assert scheduler.right_padded == (graph == "fused")

    def run(backend, request, on_step):
        return generator.complete([prompt_of(request)], request.options, backend=backend, cancelled=on_step)[0].tokens

    check_interleaved(scheduler, sizes, run, lambda request: generator.complete([prompt_of(request)], request.options)[0].tokens)


def test_interleaved_transcriptions_equal_their_runs_alone(serve_bundles, audio_files):
    """An LALM's decoder takes embeddings: prompts with different clips' frames, decode steps looked up in the token table."""
    runner = load(serve_bundles["lalm"], SessionOptions(provider="cpu"))
    clips = [load_audio(path) for path in audio_files]
    features = runner.audio_features_batch([clip.samples for clip in clips])
    sizes: list[int] = []
    scheduler = runner.new_scheduler(on_step=sizes.append)
    prompt = runner.facts["prompt"]

    def transcribe(request: Request, backend=None, on_step=None) -> list[int]:
        clip = REQUESTS.index(request) % len(clips)
        options = runner.resolve(prompt, request.options)[1]
        return runner.transcribe_batch([clips[clip]], [features[clip]], 0.0, prompt, options, backend=backend, cancelled=on_step)[0].tokens

    check_interleaved(scheduler, sizes, lambda backend, request, on_step: transcribe(request, backend, on_step), transcribe)


def test_a_failed_step_ends_the_generations_in_it_and_the_scheduler_goes_on(decoders, monkeypatch):
    generator = load(decoders["fused"], SessionOptions(provider="cpu"))
    scheduler = generator.new_scheduler()
    options = GenerationOptions(max_new_tokens=6, stop_at_eos=False)
    backend = scheduler.member()
    generator.complete(["the"], GenerationOptions(max_new_tokens=1), backend=backend)  # joined; no decode step yet
    monkeypatch.setattr(scheduler, "_run", lambda tokens, lengths: (_ for _ in ()).throw(RuntimeError("the decoder failed")))
    with pytest.raises(RuntimeError, match="the decoder failed"):
        backend.decode_step(np.array([1]))
    backend.leave()
    assert scheduler.rows == 0
    monkeypatch.undo()
    again = scheduler.member()
    try:
        tokens = generator.complete(["the quick fox"], options, backend=again)[0].tokens
    finally:
        again.leave()
    assert tokens == generator.complete(["the quick fox"], options)[0].tokens


def test_prompts_of_one_length_are_prefilled_as_one_batch_and_equal_their_runs_alone(decoders):
    generator = load(decoders["fused"], SessionOptions(provider="cpu"))
    scheduler = generator.new_scheduler()
    ids = np.random.default_rng(3).integers(3, 200, size=(4, 7))
    options = GenerationOptions(max_new_tokens=8, stop_at_eos=False)
    backend = scheduler.member()
    try:
        together = generate(backend, ids, np.ones_like(ids), options)
    finally:
        backend.leave()
    assert scheduler.prefills == 1 and scheduler.steps == 7
    for row in range(len(ids)):
        alone = generate(generator.new_backend(), ids[row : row + 1], np.ones_like(ids[row : row + 1]), options)
        assert together[row].tolist() == alone[0].tolist()


def test_int8_rows_in_a_batch_stay_within_the_int8_gate_of_their_runs_alone(checkpoints, tmp_path):
    """int8 graphs quantize activations per tensor, so a row's logits depend on its batch mates:
    not bit for bit, but within the bound the int8 gate holds a decoder to."""
    from lalm_export.parity.bounds import gate_tolerance

    bundle = tmp_path / "int8"
    export_bundle(ExportOptions(family="llm", model=str(checkpoints["llm"]), output=bundle, precision="int8"), quiet=True)
    generator = load(bundle, SessionOptions(provider="cpu"))
    scheduler = generator.new_scheduler()
    prompts = [prompt_of(request) for request in REQUESTS[:4]]
    alone = []
    for prompt in prompts:  # teacher-forced: each row is fed its run alone's tokens
        backend = generator.new_backend()
        ids, mask = generator.encode_prompts([prompt])
        logits = [backend.prefill(ids, mask)[0]]
        for _ in range(6):
            logits.append(backend.decode_step(np.array([int(logits[-1].argmax())]))[0])
        alone.append(np.stack(logits))
    members = [scheduler.member() for _ in prompts]
    batched = [[m.prefill(*generator.encode_prompts([p]))[0]] for m, p in zip(members, prompts)]
    for step in range(6):
        tokens = [int(alone[row][step].argmax()) for row in range(len(prompts))]
        with ThreadPoolExecutor(len(members)) as pool:  # every row hands in its token: one step for all
            steps = pool.map(lambda pair: pair[0].decode_step(np.array([pair[1]]))[0], zip(members, tokens))
            for row, logits in enumerate(steps):
                batched[row].append(logits)
    for member in members:
        member.leave()
    assert scheduler.steps == 6  # four rows per step
    bound = gate_tolerance("int8", "decoder").cosine
    for reference, candidate in zip(alone, batched):
        candidate = np.stack(candidate)
        cosine = (reference * candidate).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1))
        assert cosine.min() >= bound, f"a batched int8 row's logits have cosine {cosine.min():.6f} < the gate's {bound}"


@pytest.mark.parametrize("graph", ["fused", "optimum"])
def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_streams_steps(decoders, graph, monkeypatch):
    """A prompt longer than a step's prefill budget, sent while a stream runs, goes in chunks of
    the budget, one between two of the stream's steps, and its tokens equal its run alone's.
    The stream steps only after each chunk (a semaphore), so the order is fixed."""
    generator = load(decoders[graph], SessionOptions(provider="cpu"))
    scheduler = generator.new_scheduler(prefill_budget=4)
    chunks: list[tuple[int, int]] = []  # (decode steps run before it, its positions)
    chunk_ran = threading.Semaphore(0)

    def recorded(call):
        def run(values, *args):
            logits = call(values, *args)
            chunks.append((scheduler.steps, values.shape[1]))
            chunk_ran.release()
            return logits

        return run

    monkeypatch.setattr(scheduler._prefiller, "prefill", recorded(scheduler._prefiller.prefill))
    monkeypatch.setattr(scheduler._prefiller, "continue_prefill", recorded(scheduler._prefiller.continue_prefill))
    long_ids = np.random.default_rng(5).integers(3, 200, size=(1, 11))
    options = GenerationOptions(max_new_tokens=5, stop_at_eos=False)
    stream = scheduler.member()
    token = int(stream.prefill(np.array([[7, 8]]), np.ones((1, 2)))[0].argmax())
    assert chunk_ran.acquire(timeout=0)
    token = int(stream.decode_step(np.array([token]))[0].argmax())  # a step: the budget is whole again
    result: dict[str, list[int]] = {}
    late = scheduler.member()

    def generate_long() -> None:
        try:
            result["tokens"] = generate(late, long_ids, np.ones_like(long_ids), options)[0].tolist()
        finally:
            late.leave()

    thread = threading.Thread(target=generate_long)
    thread.start()
    for _ in range(3):  # 11 positions: chunks of 4, 4 and 3, each after one of the stream's steps
        assert chunk_ran.acquire(timeout=600), "the long prompt's next chunk did not run"
        token = int(stream.decode_step(np.array([token]))[0].argmax())
    while thread.is_alive():
        token = int(stream.decode_step(np.array([token]))[0].argmax())
    thread.join()
    stream.leave()
    assert chunks[1:] == [(1, 4), (2, 4), (3, 3)]
    assert result["tokens"] == generate(generator.new_backend(), long_ids, np.ones_like(long_ids), options)[0].tolist()
    assert scheduler.rows == 0
