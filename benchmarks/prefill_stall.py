"""`python -m benchmarks prefill-stall`: what a long prompt costs the streams already running.

One stream decodes through the runtime's scheduler (`runtime.scheduler`, as `runtime.serve`
runs it); after a few of its steps a long prompt arrives. Measured, in process, with the
scheduler's prefill budget (the prompt goes in chunks, one between two of the stream's steps)
and with a budget as large as the prompt (one prefill, as before chunking): the stream's
longest gap between two tokens while the prompt is prefilled, and the long prompt's time to
its first token. Medians over rounds; a steady step of the stream alone is the reference."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

WARM_STEPS = 4  # the stream's steps before the long prompt arrives (its cache and the session warm)


def one_round(model: Any, budget: int, prompt: np.ndarray, seed: int, vocabulary: int) -> dict[str, float]:
    """One stream (16 tokens drawn below `vocabulary`), then the long `prompt` under `budget`:
    the stream's step times around it and the prompt's time to first token."""
    scheduler = model.new_scheduler(prefill_budget=budget)
    stream = scheduler.member()
    ids = np.random.default_rng(seed).integers(3, vocabulary, size=(1, 16))
    logits = stream.prefill(ids, np.ones_like(ids))
    stamps: list[float] = []
    stop = threading.Event()
    warm = threading.Event()

    failed: list[BaseException] = []

    def decode() -> None:
        nonlocal logits
        length = ids.shape[1]
        try:
            while not stop.is_set():
                if length == model.context_length:  # a stream that outruns the long prompt (a loaded machine) starts over, not past its context
                    logits, length = stream.prefill(ids, np.ones_like(ids)), ids.shape[1]
                logits = stream.decode_step(logits.argmax(axis=-1))
                length += 1
                stamps.append(time.perf_counter())
                if len(stamps) == WARM_STEPS:
                    warm.set()
        except BaseException as err:  # noqa: BLE001 - raised in the measuring thread
            failed.append(err)
        finally:
            stream.leave()  # however it ends: a long prompt's chunks must not wait for steps this stream no longer runs
            warm.set()

    thread = threading.Thread(target=decode)
    thread.start()
    late = scheduler.member()
    try:
        warm.wait()
        if failed:
            raise failed[0]
        arrived = time.perf_counter()
        late.prefill(prompt, np.ones_like(prompt))
        first_token = time.perf_counter()
    finally:
        late.leave()
    count = len(stamps)
    while len(stamps) < count + 2 and thread.is_alive():  # the step that closes the last gap
        time.sleep(0.001)
    stop.set()
    thread.join()
    if failed:
        raise failed[0]
    times = np.array(stamps)
    # From the stream's last token before the prompt arrived to its first after the prompt's first token.
    during = np.concatenate([times[times <= arrived][-1:], times[(times > arrived) & (times <= first_token)], times[times > first_token][:1]])
    gaps = np.diff(during)
    steady = np.diff(times[:WARM_STEPS])
    return {
        "longest_gap_ms": float(gaps.max()) * 1e3,
        "ttft_ms": (first_token - arrived) * 1e3,
        "steady_step_ms": float(np.median(steady)) * 1e3,
        "prefill_calls": scheduler.prefills - 1,
    }


def run(bundle: Path, positions: int, rounds: int, budget: int, say=lambda text: print(text, file=sys.stderr)) -> dict[str, Any]:
    """The figures of `prefill-stall` for a decoder bundle: chunks of `budget` positions and one
    prefill, medians over `rounds`."""
    from runtime.api import load
    from runtime.errors import RuntimeUserError

    model = load(bundle)
    if model.role != "decoder":
        raise RuntimeUserError(f"{bundle} is a {model.role} bundle; prefill-stall measures a decoder bundle's scheduler")
    vocabulary = min(model.tokenizer.get_vocab_size(), 1000)
    prompt = np.random.default_rng(1).integers(3, vocabulary, size=(1, positions))
    one_round(model, budget, prompt[:, : min(positions, 64)], seed=0, vocabulary=vocabulary)  # warm-up
    figures: dict[str, Any] = {}
    for label, size in (("chunked", budget), ("whole", positions)):
        runs = []
        for index in range(rounds):
            say(f"prefill-stall: {label} (budget {size}), round {index + 1} of {rounds}")
            runs.append(one_round(model, size, prompt, seed=index, vocabulary=vocabulary))
        figures[label] = {"budget": size, **{key: round(float(np.median([r[key] for r in runs])), 1) for key in runs[0]}}
    return {"bundle": str(bundle), "precision": model.manifest.precision, "positions": positions, "rounds": rounds, "figures": figures}


def render(results: dict[str, Any]) -> str:
    machine = results["machine"]
    flags = ", ".join(machine["cpu_flags"])
    rows = results["figures"]
    lines = [
        "# A long prompt and the streams already running",
        "",
        f"Command: `{results['command']}` ({results['created']})",
        "",
        f"Machine: {machine['cpu']} ({flags}), {machine['cores']} cores. Bundle: `{results['bundle']}` ({results['precision']}); "
        f"one stream decoding through `runtime.scheduler`, then a prompt of {results['positions']} positions arrives; "
        f"medians of {results['rounds']} rounds.",
        "",
        "| prefill | budget (positions) | graph calls for the prompt | stream's longest gap between tokens, ms | stream's steady step, ms | long prompt's time to first token, ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['budget']} | {row['prefill_calls']:g} | {row['longest_gap_ms']} | {row['steady_step_ms']} | {row['ttft_ms']} |")
    chunked, whole = rows["chunked"], rows["whole"]
    lines += [
        "",
        f"The running stream's longest wait: {chunked['longest_gap_ms']} ms chunked, {whole['longest_gap_ms']} ms with one prefill "
        f"({whole['longest_gap_ms'] / chunked['longest_gap_ms']:.1f}x). The long prompt's first token: {chunked['ttft_ms']} ms chunked, "
        f"{whole['ttft_ms']} ms with one prefill ({chunked['ttft_ms'] / whole['ttft_ms']:.2f}x).",
        "",
    ]
    return "\n".join(lines)
