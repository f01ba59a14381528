"""`python -m benchmarks serve-load`: `runtime.serve` under concurrent clients on loopback,
against the same requests run one after another through `runtime.api` in process.

Per bundle: throughput and p50/p90/p99 latency (and time to first token for audio LLMs,
streamed) at each concurrency, the ratio to sequential in-process throughput measured in
the same run, the server's peak RSS; an overload phase (small --max-queue, many clients)
counts 503s and any other failure; for generating bundles, how long a short request takes
alone and while a long generation runs (the decode-step turn policy)."""

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
    max_new_tokens: int = 16
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


def request_for(role: str, clip: Path, settings: LoadSettings) -> Callable[[httpx.Client, str], tuple[int, float | None]]:
    """One request of the bundle's kind: (status, time to first token or None)."""
    data = clip.read_bytes()

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

    return features if role == "encoder" else transcription


def sequential_in_process(bundle: Path, role: str, clip: Path, settings: LoadSettings) -> list[float]:
    """Seconds per request, the same requests one after another through runtime.api (no HTTP)."""
    from runtime.api import load
    from runtime.generation import GenerationOptions

    model = load(bundle)
    if role == "encoder":
        run = lambda: model.encode_files([clip])  # noqa: E731
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


def load_phase(url: str, request: Callable, clients: int, requests: int) -> dict[str, Any]:
    """`requests` requests from `clients` concurrent clients: throughput, latency percentiles, statuses."""
    latencies, ttfts, statuses = [], [], Counter()
    lock = threading.Lock()
    remaining = [requests]

    def client_loop() -> None:
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
        for future in [pool.submit(client_loop) for _ in range(clients)]:
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
    }


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
    if manifest.role not in ("encoder", "lalm"):
        raise SystemExit(f"{bundle} is a {manifest.role} bundle; serve-load measures audio bundles (encoder or audio LLM)")
    role = manifest.role
    say(f"{bundle}: sequential in process ({settings.requests} requests)")
    sequential = sequential_in_process(bundle, role, clip, settings)
    sequential_rps = len(sequential) / sum(sequential)
    scaling = batch_scaling(bundle, role, clip)
    request = request_for(role, clip, settings)
    server = Server(bundle, settings, max_queue=max(256, settings.requests))
    try:
        load_phase(server.url, request, 1, settings.warmup)
        phases = []
        for clients in settings.concurrency:
            say(f"{bundle}: {clients} client(s)")
            phase = load_phase(server.url, request, clients, settings.requests)
            phase["vs_sequential"] = round(phase["throughput_rps"] / sequential_rps, 3)
            phases.append(phase)
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
        "request": f"{'POST /v1/audio/features' if role == 'encoder' else 'POST /v1/audio/transcriptions, stream, ' + str(settings.max_new_tokens) + ' tokens'}: one {CLIP_SECONDS:g} s clip",
        "sequential": {"throughput_rps": round(sequential_rps, 3), "latency_s_median": round(float(np.median(sequential)), 4)},
        "concurrency": phases,
        "encoder_ms_per_clip_by_batch": scaling,
        "peak_rss_mib": round(peak / 2**20, 1),
        "overload": overload,
        "turn_policy": policy,
    }


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
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB. Server: `python -m runtime.serve` on 127.0.0.1, "
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
        for phase in row["concurrency"]:
            ttft = f"{phase['ttft_s']['p50']:.4f}" if phase["ttft_s"] else ""
            lat = phase["latency_s"]
            statuses = ", ".join(f"{k}: {v}" for k, v in phase["statuses"].items())
            lines.append(
                f"| | {phase['clients']} | {phase['throughput_rps']:.1f} | {phase['vs_sequential']:.2f}x | {lat['p50']:.4f} | {lat['p90']:.4f} | {lat['p99']:.4f} | {ttft} | {statuses} |"
            )
    lines += ["", "Overload (a small --max-queue, many clients): every request is answered 200 or 503 with Retry-After.", ""]
    lines += ["| bundle | clients | --max-queue | requests | statuses | server peak RSS MiB |", "|---|---:|---:|---:|---|---:|"]
    for row in results["bundles"]:
        over = row["overload"]
        statuses = ", ".join(f"{k}: {v}" for k, v in over["statuses"].items())
        lines.append(f"| {Path(row['bundle']).name} | {over['clients']} | {over['max_queue']} | {over['requests']} | {statuses} | {over['peak_rss_mib']} |")
    sizes = list(results["bundles"][0]["encoder_ms_per_clip_by_batch"])
    lines += ["", "What batching can gain here: the encoder's milliseconds per clip at each batch size, in process (no HTTP).", ""]
    lines += ["| bundle | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for row in results["bundles"]:
        lines.append(f"| {Path(row['bundle']).name} | " + " | ".join(f"{v:.2f} ms" for v in row["encoder_ms_per_clip_by_batch"].values()) + " |")
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
            "Decode-step turns (generations take one model call each in turn): a 4-token chat alone and sent while a 150-token one runs (both with `ignore_eos`).",
            "",
        ]
        lines += ["| bundle | short alone s | short during long s | long alone s | long with short s |", "|---|---:|---:|---:|---:|"]
        for row in policies:
            p = row["turn_policy"]
            lines.append(f"| {Path(row['bundle']).name} | {p['short_alone_s']} | {p['short_during_long_s']} | {p['long_alone_s']} | {p['long_with_short_s']} |")
    if plot:
        lines += ["", f"![throughput and latency]({plot})"]
    return "\n".join(lines)


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
