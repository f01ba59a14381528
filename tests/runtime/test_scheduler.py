"""Continuous batching (`runtime.scheduler`): generations that join and leave the shared
decode batch at different steps, with prompts of different lengths, get the tokens they get
alone, on both decoder graphs (fused, Optimum's), on ids and on embeddings (an LALM), with
the cache on the host and through IO binding.

The interleaving is made deterministic by the generations' own step callback: the first
(long) generation starts the k-th request at its step k + 1 and waits until that request has
produced its first token, so request k joins the batch at a known step."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lalm_export.export.component import ExportOptions, export_bundle
from runtime.api import load
from runtime.audio import load_audio
from runtime.generation import GenerationCancelled, GenerationOptions, PromptEmbeds, generate
from runtime.scheduler import DecodeScheduler
from runtime.sessions import SessionOptions
from tests.helpers import SUBPROCESS_TIMEOUT_S

TIMEOUT_S = 600  # for a wait that ends at once unless the scheduler is stuck; a loaded machine never needs it

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
                    assert first_token[later].wait(SUBPROCESS_TIMEOUT_S), f"request {later} did not start"
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


def long_prompt_for(kind: str, decoders, serve_bundles, audio_files):
    """(runner, a long prompt: ids `(1, 11)`, or an audio LLM's prompt embeddings, and its tokens alone) for `kind`."""
    options = GenerationOptions(max_new_tokens=5, stop_at_eos=False)
    if kind == "lalm":
        runner = load(serve_bundles["lalm"], SessionOptions(provider="cpu"))
        clip = load_audio(audio_files[0])
        embeds = runner.prompt_embeds(runner.audio_features_batch([clip.samples])[0], runner.facts["prompt"], options)
        return runner, embeds, runner.generate_from(embeds, options)[0].tolist()
    runner = load(decoders[kind], SessionOptions(provider="cpu"))
    ids = np.random.default_rng(5).integers(3, 200, size=(1, 11))
    return runner, ids, generate(runner.new_backend(), ids, np.ones_like(ids), options)[0].tolist()


@pytest.mark.parametrize("kind", ["fused", "optimum", "lalm"])
def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_streams_steps(kind, decoders, serve_bundles, audio_files, monkeypatch):
    """A prompt longer than a step's prefill budget, sent while a stream runs, goes in chunks of
    the budget, one between two of the stream's steps, and its tokens equal its run alone's
    (ids on both decoder graphs; an audio LLM's prompt embeddings). The stream steps only after
    each chunk (a semaphore), so the order is fixed."""
    runner, prompt, alone = long_prompt_for(kind, decoders, serve_bundles, audio_files)
    budget = 4
    scheduler = runner.new_scheduler(prefill_budget=budget)
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
    options = GenerationOptions(max_new_tokens=5, stop_at_eos=False)
    stream = scheduler.member()
    token = int(stream.prefill(np.array([[7, 8]]), np.ones((1, 2)))[0].argmax())
    assert chunk_ran.acquire(timeout=0)
    token = int(stream.decode_step(np.array([token]))[0].argmax())  # a step: the budget is whole again
    result: dict[str, list[int]] = {}
    late = scheduler.member()
    ones = np.ones(prompt.shape[:2], dtype=np.int64)

    def generate_long() -> None:
        try:
            result["tokens"] = generate(PromptEmbeds(late, prompt) if prompt.ndim == 3 else late, ones * 0 if prompt.ndim == 3 else prompt, ones, options)[
                0
            ].tolist()
        finally:
            late.leave()

    thread = threading.Thread(target=generate_long)
    thread.start()
    count = -(-prompt.shape[1] // budget)
    for _ in range(count):  # each chunk after one of the stream's steps
        assert chunk_ran.acquire(timeout=SUBPROCESS_TIMEOUT_S), "the long prompt's next chunk did not run"
        token = int(stream.decode_step(np.array([token]))[0].argmax())
    while thread.is_alive():
        token = int(stream.decode_step(np.array([token]))[0].argmax())
    thread.join()
    stream.leave()
    sizes = [budget] * (count - 1) + [prompt.shape[1] - budget * (count - 1)]
    assert chunks[1:] == list(zip(range(1, count + 1), sizes))
    assert result["tokens"] == alone
    assert scheduler.rows == 0


def test_a_stream_stepping_without_pause_still_lets_one_chunk_in_before_each_step(decoders):
    """Fairness: the thread about to run a step first runs the waiting chunk the budget allows,
    so a long prompt gets one chunk before every step of a stream that hands its tokens in
    without pause (its own thread, woken by each step, may lose the lock to the stream's every
    time). Without that rule the stream here ran many steps between two chunks. And once the
    last chunk is done, no step runs until the prompt's row has joined: without that, its thread
    waited for the lock 26 and 235 steps in two runs, and the stream ran past its context in two more."""
    runner = load(decoders["fused"], SessionOptions(provider="cpu"))
    budget, prompt = 2, np.random.default_rng(5).integers(3, 200, size=(1, 11))
    scheduler = runner.new_scheduler(prefill_budget=budget)
    chunks: list[int] = []  # decode steps run before each of the long prompt's calls
    first_chunk = threading.Event()
    joined: list[int] = []  # decode steps run before the long prompt's row joined
    continue_prefill = scheduler._prefiller.continue_prefill

    def recorded(values, before):
        chunks.append(scheduler.steps)
        return continue_prefill(values, before)

    scheduler._prefiller.continue_prefill = recorded
    stream = scheduler.member()
    token = int(stream.prefill(np.array([[7, 8]]), np.ones((1, 2)))[0].argmax())
    token = int(stream.decode_step(np.array([token]))[0].argmax())
    late = scheduler.member()

    def prefill_long() -> None:
        try:
            prefill = scheduler._prefiller.prefill
            scheduler._prefiller.prefill = lambda *args: (prefill(*args), first_chunk.set())[0]
            late.prefill(prompt, np.ones_like(prompt))
            joined.append(scheduler.steps)
        finally:
            late.leave()

    thread = threading.Thread(target=prefill_long)
    thread.start()
    assert first_chunk.wait(SUBPROCESS_TIMEOUT_S), "the long prompt's first chunk did not run"
    start = scheduler.steps
    while thread.is_alive() or len(chunks) < 5:
        token = int(stream.decode_step(np.array([token]))[0].argmax())
    thread.join()
    stream.leave()
    # 11 positions: the first chunk spends the budget until the next step; then one chunk of 2 before each step
    assert chunks == list(range(start + 1, start + 6))
    assert joined == [chunks[-1]]


def test_a_prompt_sent_while_a_stream_steps_without_pause_joins_within_a_step(decoders):
    """A prompt's arrival takes no lock (the scheduler's queue of arrivals): whichever thread runs
    the next step takes it in, prefills it and holds the step for its join. When the caller had
    to win the lock to hand its prompt in, a stream stepping without pause held it out for 66 and
    473 steps of this tiny model (`benchmarks prefill-stall`, traced)."""
    runner = load(decoders["fused"], SessionOptions(provider="cpu"))
    scheduler = runner.new_scheduler(prefill_budget=4)
    arrived: list[int] = []  # decode steps run when each prompt arrived

    class Recorded(deque):
        def append(self, item) -> None:
            super().append(item)
            arrived.append(scheduler.steps)

    scheduler._arrivals = Recorded()
    stream = scheduler.member()
    token = int(stream.prefill(np.array([[7, 8]]), np.ones((1, 2)))[0].argmax())
    stop, running = threading.Event(), threading.Event()

    def step_without_pause() -> None:
        nonlocal token
        try:
            while not stop.is_set():
                token = int(stream.decode_step(np.array([token]))[0].argmax())
                running.set()
        finally:
            stream.leave()

    thread = threading.Thread(target=step_without_pause)
    thread.start()
    assert running.wait(SUBPROCESS_TIMEOUT_S)
    late = scheduler.member()
    try:
        late.prefill(np.array([[5, 6, 7]]), np.ones((1, 3)))
        joined = scheduler.steps  # the stream now waits for this row's token: no step runs
    finally:
        late.leave()
        stop.set()
        thread.join()
    assert joined - arrived[1] <= 1  # at most the step under way when it arrived


def test_a_member_with_prompts_of_two_lengths_joins_once_both_are_prefilled(decoders):
    """One caller's prompts of 3 and 9 positions (left padding), sent while a stream runs, with a
    budget of 4: the short one is done first, but no row joins (and holds up the steps the long
    one's chunks wait for) until both are; each row's tokens equal its run alone's."""
    runner = load(decoders["optimum"], SessionOptions(provider="cpu"))
    scheduler = runner.new_scheduler(prefill_budget=4)
    options = GenerationOptions(max_new_tokens=4, stop_at_eos=False)
    ids = np.random.default_rng(6).integers(3, 200, size=(2, 9))
    mask = np.ones_like(ids)
    mask[0, :6] = 0  # the first prompt: its last 3 positions
    stream = scheduler.member()
    token = int(stream.prefill(np.array([[7, 8]]), np.ones((1, 2)))[0].argmax())
    result: dict[str, np.ndarray] = {}
    pair = scheduler.member()

    def generate_pair() -> None:
        try:
            result["tokens"] = generate(pair, ids, mask, options)
        finally:
            pair.leave()

    def step_the_stream() -> None:  # its steps let the long prompt's chunks go on
        nonlocal token
        while thread.is_alive():
            token = int(stream.decode_step(np.array([token]))[0].argmax())

    # Daemon threads: were a row to join early, both would wait for each other for good.
    thread, stepper = threading.Thread(target=generate_pair, daemon=True), threading.Thread(target=step_the_stream, daemon=True)
    thread.start()
    stepper.start()
    stepper.join(timeout=TIMEOUT_S)
    assert not stepper.is_alive(), "the stream and the two prompts wait for each other"
    stream.leave()
    for row, start in enumerate((6, 0)):
        own = ids[row : row + 1, start:]
        assert result["tokens"][row].tolist() == generate(runner.new_backend(), own, np.ones_like(own), options)[0].tolist()
    assert scheduler.rows == 0
