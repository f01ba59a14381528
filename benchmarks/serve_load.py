"""`python -m benchmarks serve-load`: `runtime.serve` under concurrent clients on loopback,
against the same requests run one after another through `runtime.api` in process.

Per bundle: throughput and p50/p90/p99 latency (and time to first token for generating
bundles, streamed) at each concurrency, the ratio to sequential in-process throughput
measured in the same run, the server's peak RSS; an overload phase (small --max-queue, many
clients) counts 503s and any other failure. Generating bundles also report the decode batch
sizes the server ran (its `lalm_decode_batch_size` histogram) per phase; decoder bundles
their aggregate tokens/s against one stream's, and the decoder's step time by batch size in
process (what continuous batching can gain), and a phase at the most clients started one after
another rather than at once (the steady state of that many streams, not a burst of them); audio
LLMs how long a short request takes alone and while a long generation runs."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import psutil
import soundfile as sf

from lalm_export.parity.signals import speech_like
from runtime.server.readiness import free_port, wait_until_healthy

CLIP_SECONDS = 2.0


@dataclass(frozen=True)
class LoadSettings:
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 64
    max_batch_size: int = 16
    max_batch_wait_ms: float = 2.0
    max_new_tokens: int = 16  # a transcription's cap
    decode_tokens: int = 128  # a decoder bundle's chat completion: exactly this many (EOS ignored)
    overload_clients: int = 32
    overload_queue: int = 4
    warmup: int = 4


class Server:
    """`python -m runtime.serve` in a child process, its RSS sampled every 20 ms."""

    def __init__(self, bundle: Path, settings: LoadSettings, max_queue: int) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "runtime.serve", str(bundle), "--name", "bench", "--port", str(self.port), "-q", "--max-queue", str(max_queue)]
        command += ["--max-batch-size", str(settings.max_batch_size), "--max-batch-wait-ms", str(settings.max_batch_wait_ms)]
        command += ["--max-new-tokens", str(settings.max_new_tokens)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.peak_rss = 0
        self._stop = threading.Event()
        wait_until_healthy(self.url, self.process, 120)
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        process = psutil.Process(self.process.pid)
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        self.process.wait(timeout=60)


CHAT_PROMPT = "Write a long story about a lighthouse keeper and the ships she guides home."


def request_for(role: str, clip: Path, settings: LoadSettings) -> Callable[[httpx.Client, str], tuple[int, float | None]]:
    """One request of the bundle's kind: (status, time to first token or None)."""
    data = clip.read_bytes()

    def chat(client: httpx.Client, url: str) -> tuple[int, float | None]:
        """Streamed, read to the end; its time to first token comes from the server's histogram
        (random weights' tokens often decode to no text, so the stream cannot show the first)."""
        body = {
            "model": "bench",
            "messages": [{"role": "user", "content": CHAT_PROMPT}],
            "max_tokens": settings.decode_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            for _ in response.iter_lines():
                pass
            return response.status_code, None

    def features(client: httpx.Client, url: str) -> tuple[int, float | None]:
        return client.post(f"{url}/v1/audio/features", data={"model": "bench"}, files={"file": ("clip.wav", data)}).status_code, None

    def transcription(client: httpx.Client, url: str) -> tuple[int, float | None]:
        start, first = time.perf_counter(), None
        form = {"model": "bench", "stream": "true"}
        with client.stream("POST", f"{url}/v1/audio/transcriptions", data=form, files={"file": ("clip.wav", data)}) as response:
            for line in response.iter_lines():
                if first is None and "transcript.text.delta" in line:
                    first = time.perf_counter() - start
            return response.status_code, first

    return {"encoder": features, "lalm": transcription, "decoder": chat}[role]


def sequential_in_process(bundle: Path, role: str, clip: Path, settings: LoadSettings) -> list[float]:
    """Seconds per request, the same requests one after another through runtime.api (no HTTP)."""
    from runtime.api import load
    from runtime.generation import GenerationOptions

    model = load(bundle)
    if role == "encoder":
        run = lambda: model.encode_files([clip])  # noqa: E731
    elif role == "decoder":
        options = GenerationOptions(max_new_tokens=settings.decode_tokens, stop_at_eos=False)
        run = lambda: model.complete([CHAT_PROMPT], options)  # noqa: E731 - a one-message chat's prompt is its text (no chat template)
    else:
        options = GenerationOptions(max_new_tokens=settings.max_new_tokens)
        run = lambda: model.transcribe([clip], None, options)  # noqa: E731
    for _ in range(settings.warmup):
        run()
    seconds = []
    for _ in range(settings.requests):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds


def batch_scaling(bundle: Path, role: str, clip: Path, sizes: tuple[int, ...] = (1, 4, 16), rounds: int = 5) -> dict[str, float]:
    """Milliseconds per clip when the encoder runs `size` equal clips as one batch, in process:
    what dynamic batching can gain at most on this machine."""
    from runtime.api import load
    from runtime.audio import load_audio

    model, audio = load(bundle), load_audio(clip)
    run = (lambda clips: model.encode(clips)) if role == "encoder" else (lambda clips: model.audio_features_batch([c.samples for c in clips]))
    figures = {}
    for size in sizes:
        run([audio] * size)
        seconds = []
        for _ in range(rounds):
            start = time.perf_counter()
            run([audio] * size)
            seconds.append(time.perf_counter() - start)
        figures[str(size)] = round(float(np.median(seconds)) / size * 1e3, 3)
    return figures


def streams_in_process(bundle: Path, settings: LoadSettings, streams: int, rounds: int = 2) -> dict[str, Any]:
    """`streams` threads each running `rounds` chat completions one after another through one
    `DecodeScheduler` in process (no HTTP, no client): aggregate tokens/s, and where the wall
    time went: decode steps' graph calls, prefill calls, and the rest (the threads handing
    their tokens in and getting their logits, and steps run part full while a round's
    prompts are prefilled)."""
    from runtime.api import load
    from runtime.generation import GenerationOptions
    from runtime.runners.requests import CompletionRequest

    model = load(bundle)
    scheduler = model.new_scheduler()
    request = CompletionRequest(CHAT_PROMPT, GenerationOptions(max_new_tokens=settings.decode_tokens, stop_at_eos=False))

    def stream() -> None:
        for _ in range(rounds):
            member = scheduler.member()
            try:
                model.prepare(request).run(member, lambda text: None)
            finally:
                member.leave()

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        for future in [pool.submit(stream) for _ in range(streams)]:
            future.result()
    wall = time.perf_counter() - start
    return {
        "streams": streams,
        "tokens_per_s": round(streams * rounds * settings.decode_tokens / wall, 1),
        "wall_s": round(wall, 3),
        "steps": scheduler.steps,
        "step_s": round(scheduler.step_seconds, 3),
        "prefills": scheduler.prefills,
        "prefill_s": round(scheduler.prefill_seconds, 3),
        "rest_s": round(wall - scheduler.step_seconds - scheduler.prefill_seconds, 3),
    }


def decode_step_scaling(bundle: Path, sizes: tuple[int, ...] = (1, 4, 16), steps: int = 16) -> dict[str, float]:
    """Milliseconds of one decode step of `size` rows (a 16-token prompt each, the median of
    `steps` steps after one), in process: what batching decode steps can gain on this machine."""
    from runtime.api import load
    from runtime.ort_backends import OrtDecoderBackend

    model = load(bundle)
    figures = {}
    for size in sizes:
        backend = OrtDecoderBackend(model.session)
        ids = np.full((size, 16), 100, dtype=np.int64)
        logits = backend.prefill(ids, np.ones_like(ids))
        seconds = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            logits = backend.decode_step(logits.argmax(axis=-1))
            seconds.append(time.perf_counter() - start)
        figures[str(size)] = round(float(np.median(seconds[1:])) * 1e3, 3)
    return figures


def histograms(url: str) -> dict[str, dict[str, float]]:
    """The server's decode batch and time-to-first-token histograms so far (its /metrics):
    per metric, cumulative counts by `le ` bucket, the `count` and the `sum`."""
    figures: dict[str, dict[str, float]] = {"decode_batch_size": {}, "time_to_first_token_seconds": {}}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for metric, values in figures.items():
            if line.startswith(f"lalm_{metric}_"):
                name, value = line.rsplit(" ", 1)
                key = name.split("{")[0].removeprefix(f"lalm_{metric}_")
                values["le " + name.split('le="')[1].split('"')[0] if key == "bucket" else key] = float(value)
    return figures


def phase_histograms(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> tuple[dict[str, Any], dict[str, float]]:
    """What one phase added: its decode steps (how many, mean rows, steps per batch-size bucket)
    and its time to first token as the server measured it (mean, exact; p50 interpolated in its
    bucket, as Prometheus' histogram_quantile does)."""
    batches = _delta(before["decode_batch_size"], after["decode_batch_size"])
    steps = int(batches.get("count", 0))
    buckets, below = {}, 0.0
    for bound, cumulative in _buckets(batches):
        buckets[bound] = int(cumulative - below)
        below = cumulative
    decode = {"steps": steps, "mean_rows": round(batches.get("sum", 0.0) / steps, 2) if steps else 0.0, "steps_by_rows_le": buckets}
    ttft = _delta(before["time_to_first_token_seconds"], after["time_to_first_token_seconds"])
    count = ttft.get("count", 0.0)
    first = {"mean": round(ttft["sum"] / count, 4), "p50": round(_quantile(ttft, 0.5), 4)} if count else {}
    return decode, first


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after}


def _buckets(values: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(((key[3:], value) for key, value in values.items() if key.startswith("le ")), key=lambda item: float(item[0]))


def _quantile(values: dict[str, float], q: float) -> float:
    """The q-quantile of a cumulative histogram, linear within its bucket."""
    target, lower, below = q * values["count"], 0.0, 0.0
    for bound, cumulative in _buckets(values):
        if cumulative >= target:
            upper = float(bound) if bound != "+Inf" else lower
            return lower + (upper - lower) * (target - below) / max(cumulative - below, 1e-12)
        lower, below = float(bound), cumulative
    return lower


def load_phase(url: str, request: Callable, clients: int, requests: int, stagger_s: float = 0.0) -> dict[str, Any]:
    """`requests` requests from `clients` concurrent clients: throughput, latency percentiles,
    statuses. `stagger_s`: the clients start spread over this many seconds (client i after
    i/clients of it) instead of at once."""
    latencies, ttfts, statuses = [], [], Counter()
    lock = threading.Lock()
    remaining = [requests]

    def client_loop(index: int) -> None:
        time.sleep(stagger_s * index / clients)
        with httpx.Client(timeout=300) as client:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                try:
                    status, ttft = request(client, url)
                except httpx.TransportError as err:
                    status, ttft = type(err).__name__, None
                with lock:
                    latencies.append(time.perf_counter() - start)
                    statuses[str(status)] += 1
                    if ttft is not None:
                        ttfts.append(ttft)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop, index) for index in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": requests,
        "wall_s": round(wall, 3),
        "throughput_rps": round(requests / wall, 3),
        "latency_s": {p: round(float(np.percentile(latencies, q)), 4) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))},
        "ttft_s": {p: round(float(np.percentile(ttfts, q)), 4) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))} if ttfts else None,
        "statuses": dict(statuses),
        **({"stagger_s": round(stagger_s, 4)} if stagger_s else {}),
    }


def measured_phase(
    url: str, request: Callable, role: str, settings: LoadSettings, sequential_rps: float, clients: int, stagger_s: float = 0.0
) -> dict[str, Any]:
    """One load phase (`load_phase`) with its ratio to the sequential rate, and for generating
    bundles what the server's histograms gained in it; decoders also its tokens/s."""
    before = histograms(url) if role != "encoder" else {}
    phase = load_phase(url, request, clients, settings.requests, stagger_s)
    phase["vs_sequential"] = round(phase["throughput_rps"] / sequential_rps, 3)
    if role != "encoder":
        phase["decode_batches"], phase["server_ttft_s"] = phase_histograms(before, histograms(url))
    if role == "decoder":
        phase["tokens_per_s"] = round(phase["throughput_rps"] * settings.decode_tokens, 1)
    return phase


def staggered_phase(url: str, request: Callable, role: str, settings: LoadSettings, sequential_rps: float, alone: dict[str, Any]) -> dict[str, Any] | None:
    """The most clients again, started one after another over one request's time alone (its
    p50 at one client) rather than at once: the steady state of that many streams, where a
    request arrives while the others run. Closed-loop clients that start together send their
    requests in bursts (equal requests finish together), and a burst's prompts wait for each
    other's prefill; here each waits only for the step in progress. None when the most
    clients is one."""
    clients = max(settings.concurrency)
    if clients == 1:
        return None
    return measured_phase(url, request, role, settings, sequential_rps, clients, stagger_s=alone["latency_s"]["p50"])


def turn_policy(url: str, settings: LoadSettings) -> dict[str, float]:
    """A 4-token chat alone, then sent while a 150-token generation runs: what the turn policy costs it."""

    def chat(client: httpx.Client, tokens: int, audio: str) -> float:
        content = [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}, {"type": "text", "text": "Transcribe the audio:"}]
        start = time.perf_counter()
        body = {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": tokens, "ignore_eos": True}
        response = client.post(f"{url}/v1/chat/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - start

    import base64

    buffer = tempfile.SpooledTemporaryFile()
    sf.write(buffer, speech_like(0.5, seed=3), 16_000, format="WAV")
    buffer.seek(0)
    audio = base64.b64encode(buffer.read()).decode()
    with httpx.Client(timeout=300) as client:
        chat(client, 4, audio)
        alone = float(np.median([chat(client, 4, audio) for _ in range(5)]))
        long_alone = chat(client, 150, audio)
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(chat, httpx.Client(timeout=300), 150, audio)
            time.sleep(long_alone / 4)
            during = chat(client, 4, audio)
            long_during = long.result()
    return {
        "short_alone_s": round(alone, 4),
        "short_during_long_s": round(during, 4),
        "long_alone_s": round(long_alone, 4),
        "long_with_short_s": round(long_during, 4),
    }


def run_bundle(bundle: Path, settings: LoadSettings, clip: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    role = manifest.role
    say(f"{bundle}: sequential in process ({settings.requests} requests)")
    sequential = sequential_in_process(bundle, role, clip, settings)
    sequential_rps = len(sequential) / sum(sequential)
    scaling = decode_step_scaling(bundle) if role == "decoder" else batch_scaling(bundle, role, clip)
    in_process = [streams_in_process(bundle, settings, n) for n in sorted({1, max(settings.concurrency)})] if role == "decoder" else None
    request = request_for(role, clip, settings)
    server = Server(bundle, settings, max_queue=max(256, settings.requests))
    try:
        load_phase(server.url, request, 1, settings.warmup)
        phases = []
        for clients in settings.concurrency:
            say(f"{bundle}: {clients} client(s)")
            phases.append(measured_phase(server.url, request, role, settings, sequential_rps, clients))
        alone = next((phase for phase in phases if phase["clients"] == 1), None)
        staggered = staggered_phase(server.url, request, role, settings, sequential_rps, alone) if role != "encoder" and alone else None
        for phase in [*phases, *([staggered] if staggered else [])] if role == "decoder" and alone else []:
            phase["vs_one_client"] = round(phase["throughput_rps"] / alone["throughput_rps"], 3)
            phase["ttft_vs_one_client"] = round(phase["server_ttft_s"]["p50"] / alone["server_ttft_s"]["p50"], 3)
        policy = turn_policy(server.url, settings) if role == "lalm" else None
        peak = server.peak_rss
    finally:
        server.stop()
    say(f"{bundle}: overload ({settings.overload_clients} clients, --max-queue {settings.overload_queue})")
    small = Server(bundle, settings, max_queue=settings.overload_queue)
    try:
        overload = load_phase(small.url, request, settings.overload_clients, settings.requests * 2)
        overload.update(max_queue=settings.overload_queue, peak_rss_mib=round(small.peak_rss / 2**20, 1))
    finally:
        small.stop()
    return {
        "bundle": str(bundle),
        "role": role,
        "family": manifest.family,
        "precision": manifest.precision,
        "request": describe_request(role, settings),
        "sequential": {"throughput_rps": round(sequential_rps, 3), "latency_s_median": round(float(np.median(sequential)), 4)},
        "concurrency": phases,
        "staggered": staggered,
        **({"decode_step_ms_by_batch": scaling, "streams_in_process": in_process} if role == "decoder" else {"encoder_ms_per_clip_by_batch": scaling}),
        "peak_rss_mib": round(peak / 2**20, 1),
        "overload": overload,
        "turn_policy": policy,
    }


def describe_request(role: str, settings: LoadSettings) -> str:
    if role == "encoder":
        return f"POST /v1/audio/features: one {CLIP_SECONDS:g} s clip"
    if role == "lalm":
        return f"POST /v1/audio/transcriptions, stream, at most {settings.max_new_tokens} tokens: one {CLIP_SECONDS:g} s clip"
    return f"POST /v1/chat/completions, stream, {settings.decode_tokens} tokens (ignore_eos): a {len(CHAT_PROMPT.split())}-word prompt"


def run_serve_load(bundles: list[Path], settings: LoadSettings, command: str, quiet: bool = False) -> dict[str, Any]:
    from benchmarks.machine import describe_machine

    say = (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="lalm-serve-load-") as tmp:
        clip = Path(tmp) / "clip.wav"
        sf.write(clip, speech_like(CLIP_SECONDS, seed=1), 16_000, subtype="FLOAT")
        rows = [run_bundle(bundle, settings, clip, say) for bundle in bundles]
    return {"command": command, "machine": describe_machine(), "settings": settings.__dict__, "bundles": rows}


def render_markdown(results: dict[str, Any], plot: str | None) -> str:
    machine, settings = results["machine"], results["settings"]
    lines = [
        "# Serving under load",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {machine['cpu']} ({', '.join(machine.get('cpu_flags', []))}; int8 kernels {machine.get('int8_kernels', '?')}), "
        f"{machine['cores']} cores, {machine['memory_gib']} GiB. Server: `python -m runtime.serve` on 127.0.0.1, "
        f"--max-batch-size {settings['max_batch_size']}, --max-batch-wait-ms {settings['max_batch_wait_ms']:g}; clients: threads with one "
        f"HTTP connection each; {settings['requests']} requests per concurrency. Sequential: the same requests one after another through "
        "`runtime.api` in the benchmark's process (no HTTP), measured in the same run.",
        "",
        "| bundle | clients | req/s | vs sequential | p50 s | p90 s | p99 s | TTFT p50 s | statuses |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["bundles"]:
        name = f"{Path(row['bundle']).name} ({row['family']} {row['role']}, {row['precision']})"
        lines.append(f"| {name} | sequential | {row['sequential']['throughput_rps']:.1f} | 1.00x | {row['sequential']['latency_s_median']:.4f} | | | | |")
        for clients, phase in labelled_phases(row):
            ttft = f"{phase['ttft_s']['p50']:.4f}" if phase["ttft_s"] else ""
            lat = phase["latency_s"]
            statuses = ", ".join(f"{k}: {v}" for k, v in phase["statuses"].items())
            lines.append(
                f"| | {clients} | {phase['throughput_rps']:.1f} | {phase['vs_sequential']:.2f}x | {lat['p50']:.4f} | {lat['p90']:.4f} | {lat['p99']:.4f} | {ttft} | {statuses} |"
            )
    if any(row.get("staggered") for row in results["bundles"]):
        lines += [
            "",
            "*staggered*: the most clients again, started one after another over one request's p50 time at one client instead of at once "
            "(the steady state of that many streams: a request arrives while the others run, not in a burst with all of them); its "
            "throughput's wall clock includes that start.",
        ]
    lines += ["", "Overload (a small --max-queue, many clients): every request is answered 200 or 503 with Retry-After.", ""]
    lines += ["| bundle | clients | --max-queue | requests | statuses | server peak RSS MiB |", "|---|---:|---:|---:|---|---:|"]
    for row in results["bundles"]:
        over = row["overload"]
        statuses = ", ".join(f"{k}: {v}" for k, v in over["statuses"].items())
        lines.append(f"| {Path(row['bundle']).name} | {over['clients']} | {over['max_queue']} | {over['requests']} | {statuses} | {over['peak_rss_mib']} |")
    lines += scaling_tables(results["bundles"])
    lines += decoder_tables(results["bundles"])
    lines += [
        "",
        "Peak RSS of the server during the concurrency phases: "
        + ", ".join(f"{Path(r['bundle']).name} {r['peak_rss_mib']} MiB" for r in results["bundles"])
        + ".",
    ]
    policies = [r for r in results["bundles"] if r["turn_policy"]]
    if policies:
        lines += [
            "",
            "A short request during a long one (their decode steps share one batch): a 4-token chat alone and sent while a 150-token one runs (both with `ignore_eos`).",
            "",
        ]
        lines += ["| bundle | short alone s | short during long s | long alone s | long with short s |", "|---|---:|---:|---:|---:|"]
        for row in policies:
            p = row["turn_policy"]
            lines.append(f"| {Path(row['bundle']).name} | {p['short_alone_s']} | {p['short_during_long_s']} | {p['long_alone_s']} | {p['long_with_short_s']} |")
    if plot:
        lines += ["", f"![throughput and latency]({plot})"]
    return "\n".join(lines)


def scaling_tables(rows: list[dict[str, Any]]) -> list[str]:
    """What batching can gain here, in process: the encoder's ms per clip, the decoder's ms per step, by batch size."""
    lines = []
    for key, what in (
        ("encoder_ms_per_clip_by_batch", "the encoder's milliseconds per clip"),
        ("decode_step_ms_by_batch", "one decode step's milliseconds (all rows)"),
    ):
        chosen = [row for row in rows if key in row]
        if not chosen:
            continue
        sizes = list(chosen[0][key])
        lines += ["", f"What batching can gain here: {what} at each batch size, in process (no HTTP).", ""]
        lines += ["| bundle | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---:|" * len(sizes)]
        lines += [f"| {Path(row['bundle']).name} | " + " | ".join(f"{v:.2f} ms" for v in row[key].values()) + " |" for row in chosen]
    return lines


def decoder_tables(rows: list[dict[str, Any]]) -> list[str]:
    """Generating bundles: the decode batches each phase ran; decoders: tokens/s against one client's and time to first token."""
    lines = []
    generating = [row for row in rows if row["role"] != "encoder"]
    if not generating:
        return lines
    lines += [
        "",
        "Decode steps per phase (the server's `lalm_decode_batch_size` histogram): steps, mean rows per step, steps by rows (bucket upper bounds).",
        "",
    ]
    lines += ["| bundle | clients | steps | mean rows | steps by rows |", "|---|---:|---:|---:|---|"]
    for row in generating:
        for clients, phase in labelled_phases(row):
            batches = phase["decode_batches"]
            spread = ", ".join(f"<={le}: {n}" for le, n in batches["steps_by_rows_le"].items() if n and le != "+Inf")
            lines.append(f"| {Path(row['bundle']).name} | {clients} | {batches['steps']} | {batches['mean_rows']} | {spread} |")
    decoders = [row for row in generating if row["role"] == "decoder"]
    if decoders:
        lines += [
            "",
            "Decoders: aggregate tokens/s of streamed chat completions against one client's, and time to first token as the server measured "
            "it (`lalm_time_to_first_token_seconds`: the mean exactly, p50 interpolated within its bucket; random weights stream no text, "
            "so the client cannot see the first token).",
            "",
        ]
        lines += ["| bundle | clients | tokens/s | vs 1 client | TTFT mean s | TTFT p50 s | TTFT p50 vs 1 client |", "|---|---:|---:|---:|---:|---:|---:|"]
        for row in decoders:
            for clients, phase in labelled_phases(row):
                ttft = phase["server_ttft_s"]
                versus = (f"{phase['vs_one_client']:.2f}x", f"{phase['ttft_vs_one_client']:.2f}x") if "vs_one_client" in phase else ("", "")
                lines.append(
                    f"| {Path(row['bundle']).name} | {clients} | {phase['tokens_per_s']} | {versus[0]} | {ttft['mean']} | {ttft['p50']} | {versus[1]} |"
                )
        lines += streams_table(decoders)
    return lines


def streams_table(decoders: list[dict[str, Any]]) -> list[str]:
    """Concurrent streams in process, without HTTP: tokens/s and where the wall time went."""
    lines = [
        "",
        "The same chat completions from concurrent streams in process (threads over one decode scheduler, two each; no HTTP, no client): "
        "tokens/s and where the wall time went. *Rest*: the threads handing tokens in and getting logits back, and steps run part full "
        "while a round's prompts are prefilled.",
        "",
        "| bundle | streams | tokens/s | vs 1 stream | wall s | decode steps | in steps s | prefill calls | in prefills s | rest s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in decoders:
        runs = row.get("streams_in_process") or []
        for run in runs:
            versus = run["tokens_per_s"] / runs[0]["tokens_per_s"]
            lines.append(
                f"| {Path(row['bundle']).name} | {run['streams']} | {run['tokens_per_s']} | {versus:.2f}x | {run['wall_s']} | {run['steps']} | "
                f"{run['step_s']} | {run['prefills']} | {run['prefill_s']} | {run['rest_s']} |"
            )
    return lines


def labelled_phases(row: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A bundle's load phases with the clients column's label: each concurrency, then the staggered one."""
    phases = [(str(phase["clients"]), phase) for phase in row["concurrency"]]
    return phases + ([(f"{row['staggered']['clients']}, staggered", row["staggered"])] if row.get("staggered") else [])


def render_plot(results: dict[str, Any], folder: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row in results["bundles"]:
        name = Path(row["bundle"]).name
        clients = [p["clients"] for p in row["concurrency"]]
        line = left.plot(clients, [p["throughput_rps"] for p in row["concurrency"]], marker="o", label=f"{name} (server)")[0]
        left.axhline(row["sequential"]["throughput_rps"], color=line.get_color(), linestyle="--", label=f"{name} (sequential, in process)")
        right.plot(clients, [p["latency_s"]["p50"] for p in row["concurrency"]], marker="o", color=line.get_color(), label=f"{name} p50")
        right.plot(clients, [p["latency_s"]["p99"] for p in row["concurrency"]], marker="x", linestyle=":", color=line.get_color(), label=f"{name} p99")
    left.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="requests / s", title="Throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds", title="Latency")
    for axis in (left, right):
        axis.set_xticks([p["clients"] for p in results["bundles"][0]["concurrency"]], labels=[str(p["clients"]) for p in results["bundles"][0]["concurrency"]])
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "serve-load.png", dpi=110)
    plt.close(fig)
    return "serve-load.png"


def write_serve_load(results: dict[str, Any], folder: Path) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot = render_plot(results, folder)
    (folder / "report.md").write_text(render_markdown(results, plot) + "\n", encoding="utf-8")
