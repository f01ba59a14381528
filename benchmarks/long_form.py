"""`python -m benchmarks long-form`: recordings longer than the window through an audio LLM
bundle (runtime.longform): peak memory of a long recording against a short clip, and the
real-time factor, each run in a child process of its own (`python -m runtime.infer`'s path:
`LalmRunner.transcribe`), with the recording written to disk first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from runtime.errors import RuntimeUserError

CHILD = """
import json, sys, time
from runtime.api import load
from runtime.generation import GenerationOptions

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

start = time.perf_counter()
runner = load(sys.argv[1])
loaded = time.perf_counter()
result = runner.transcribe(sys.argv[2], None, GenerationOptions(max_new_tokens=int(sys.argv[3])))[0]
done = time.perf_counter()
print(json.dumps({"load_s": loaded - start, "transcribe_s": done - loaded, "audio_s": result.audio_s, "pieces": len(result.segments),
                  "tokens": len(result.tokens), "peak_bytes": status("VmHWM"), "split": runner.split_for(None)}))
"""


def speech_recording(path: Path, seconds: float, seed: int = 0) -> None:
    """espeak-ng sentences in six voices with pauses of 0.4-4 s, written in blocks up to `seconds`."""
    import shutil

    import soundfile as sf

    from runtime.audio import resample

    if shutil.which("espeak-ng") is None:
        raise RuntimeUserError("long-form --audio speech needs espeak-ng (apt-get install espeak-ng); or pass --audio dtmf")
    rng = np.random.default_rng(seed)
    sentences = []
    for index, text in enumerate(SENTENCES):
        wav = path.with_name(f"sentence{index}.wav")
        subprocess.run(["espeak-ng", "-v", f"en+{'mf'[index % 2]}{index % 6 + 1}", "-w", str(wav), text], check=True)
        samples, rate = sf.read(wav, dtype="float32")
        sentences.append(resample(samples, rate) * 0.8)
    write_in_blocks(path, seconds, lambda: (sentences[int(rng.integers(len(sentences)))], float(rng.choice([0.4, 1.0, 2.5, 4.0]))))


def dtmf_recording(path: Path, seconds: float, seed: int = 0) -> None:
    """The DTMF demo's key clips with 3.5-5 s of quiet noise between them, up to `seconds`."""
    from lalm_export.demo.dtmf import dtmf_clip

    rng = np.random.default_rng(seed)

    def next_clip() -> tuple[np.ndarray, float]:
        keys = "".join(rng.choice(list("0123456789"), size=int(rng.integers(3, 7))))
        return dtmf_clip(keys, rng), float(rng.uniform(3.5, 5.0))

    write_in_blocks(path, seconds, next_clip, noise=0.002)


def write_in_blocks(path: Path, seconds: float, next_part, noise: float = 0.0) -> None:
    """A 16 kHz PCM-16 wav of `seconds`, appended part by part (never whole in memory)."""
    import soundfile as sf

    rng = np.random.default_rng(1)
    total = int(seconds * 16_000)
    with sf.SoundFile(path, "w", 16_000, 1, subtype="PCM_16") as handle:
        written = 0
        while written < total:
            clip, pause = next_part()
            part = np.concatenate([clip, noise * rng.standard_normal(int(pause * 16_000)).astype(np.float32)])[: total - written]
            handle.write(part)
            written += len(part)


def measure(bundle: Path, audio: Path, tokens: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(audio), str(tokens)], capture_output=True, text=True, env=os.environ)
    if result.returncode != 0:
        raise RuntimeUserError(f"long-form: {audio.name} through {bundle} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(bundles: list[Path], audio: str, minutes: list[float], short_seconds: float, tokens: int, work: Path) -> list[dict]:
    """For each bundle: a `short_seconds` clip and recordings of each of `minutes`, each in a child process."""
    write = speech_recording if audio == "speech" else dtmf_recording
    rows = []
    for length in [short_seconds / 60, *minutes]:
        path = work / f"{audio}-{length * 60:g}s.wav"
        if not path.is_file():
            write(path, length * 60)
        for bundle in bundles:
            figures = measure(bundle, path, tokens)
            rows.append(
                {
                    "bundle": str(bundle),
                    "audio": audio,
                    "seconds": round(figures["audio_s"], 1),
                    "pieces": figures["pieces"],
                    "split": figures["split"],
                    "tokens": figures["tokens"],
                    "transcribe_s": round(figures["transcribe_s"], 2),
                    "real_time_factor": round(figures["transcribe_s"] / figures["audio_s"], 4),
                    "peak_rss_gb": round(figures["peak_bytes"] / 1e9, 3),
                }
            )
            print(
                f"{bundle.name}: {figures['audio_s']:.0f} s in {figures['pieces']} piece(s), {figures['transcribe_s']:.1f} s "
                f"(RTF {rows[-1]['real_time_factor']:.4f}), peak RSS {rows[-1]['peak_rss_gb']:.2f} GB",
                file=sys.stderr,
            )
    return rows


def server_memory(bundle: Path, short: Path, long: Path, tokens: int) -> list[dict]:
    """RSS of a `runtime.serve` process over the bundle: after start, then after each of short,
    long, short, long, short transcriptions (verbose_json), one at a time."""
    import time

    import httpx2 as httpx

    from runtime.server.readiness import free_port, wait_until_healthy

    port = free_port()
    command = [sys.executable, "-m", "runtime.serve", str(bundle), "--name", "lalm", "--port", str(port), "-q", "--max-body-mb", "1000"]
    process = subprocess.Popen([*command, "--max-new-tokens", str(tokens)], stderr=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"

    def memory(step: str, seconds: float | None = None) -> dict:
        fields = {line.split()[0][:-1]: int(line.split()[1]) * 1024 for line in open(f"/proc/{process.pid}/status") if line.startswith(("VmRSS", "VmHWM"))}
        return {"after": step, "request_s": seconds, "rss_gb": round(fields["VmRSS"] / 1e9, 3), "peak_gb": round(fields["VmHWM"] / 1e9, 3)}

    try:
        wait_until_healthy(url, process, 600)
        rows = [memory("start")]
        for path in (short, long, short, long, short):
            start = time.perf_counter()
            with open(path, "rb") as handle:
                reply = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "lalm"}, files={"file": handle}, timeout=3600)
            reply.raise_for_status()
            rows.append(memory(path.name, round(time.perf_counter() - start, 2)))
            print(f"server {bundle.name}: after {path.name}: RSS {rows[-1]['rss_gb']:.2f} GB, peak {rows[-1]['peak_gb']:.2f} GB", file=sys.stderr)
        return rows
    finally:
        process.terminate()
        process.wait()


def render(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# Long recordings: memory and real-time factor",
        "",
        f"Made by `{results['command']}` on {results['created']}; {machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['cores']} cores.",
        "Each row is one child process: load the bundle, `LalmRunner.transcribe(file)` (what `runtime.infer` runs), peak RSS (VmHWM).",
        "",
        "| bundle | audio | seconds | pieces | split | tokens | transcribe s | real-time factor | peak RSS GB | peak vs the short clip |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    short = {}
    for row in results["rows"]:
        short.setdefault(row["bundle"], row["peak_rss_gb"])
        ratio = row["peak_rss_gb"] / short[row["bundle"]]
        lines.append(
            f"| {Path(row['bundle']).name} | {row['audio']} | {row['seconds']:g} | {row['pieces']} | {row['split']} | {row['tokens']} | "
            f"{row['transcribe_s']:.1f} | {row['real_time_factor']:.4f} | {row['peak_rss_gb']:.3f} | {ratio:.2f}× |"
        )
    for bundle, rows in results.get("server", {}).items():
        lines += [
            "",
            f"`runtime.serve {Path(bundle).name}`, one request at a time, RSS after each:",
            "",
            "| after | request s | RSS GB | peak GB |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {row['after']} | {row['request_s'] if row['request_s'] is not None else ''} | {row['rss_gb']:.3f} | {row['peak_gb']:.3f} |" for row in rows
        ]
    return "\n".join(lines) + "\n"


SENTENCES = [
    "The weather is mild today and the river runs slowly past the mill.",
    "Please send the report to the office before noon on Friday.",
    "A small boat drifted across the lake while the children watched.",
    "We will meet again next week to talk about the new plan.",
    "Turn left at the second light and park behind the library.",
    "The results of the test will be ready in about an hour.",
]
