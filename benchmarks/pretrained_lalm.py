"""`python -m benchmarks pretrained-lalm`: a Hugging Face audio-LLM checkpoint of real sizes,
exported with `lalm-export --lalm`, against the checkpoint's own eager `generate`.

The checkpoint is Qwen2-Audio's architecture with random weights: its audio tower at the
published size (Qwen2-Audio-7B's Whisper-large-v3-sized encoder: 32 layers, width 1280, 128 mel
bins) and Qwen2.5-0.5B's decoder (Qwen2-Audio-7B's own 7B decoder does not fit an fp32 export in
24 GiB). Eager transformers `generate(**processor(text=prompt, audio=clip))` in fp32 and bf16
(where the CPU has bf16 instructions) against the bundle in fp32, int8 (encoder and decoder) and
an int8 decoder behind the fp32 tower,
on one clip of speech-like audio and a fixed number of new tokens (EOS ignored), interleaved after
warm-up; the time split into encoder (front end included), prefill and decode."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.lalm_bench import lalm_rows
from benchmarks.machine import report_header
from benchmarks.measure import interleaved, peak_rss
from benchmarks.presets import eager_precisions
from benchmarks.report import lalm_table

# Qwen2-Audio-7B's audio tower and Qwen2.5-0.5B's decoder
TOWER = {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "num_mel_bins": 128}
DECODER = {
    "vocab_size": 151_936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "max_position_embeddings": 32_768, "tie_word_embeddings": True,
}  # fmt: skip
# variant -> (encoder, decoder) precision. A 32-layer tower in int8 may miss the gate's audio
# feature bound (cosine 0.999): then the int8 decoder behind the fp32 tower is what a user gets.
VARIANTS = {"fp32": ("fp32", "fp32"), "int8": ("int8", "int8"), "int8-decoder": ("fp32", "int8")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_checkpoint(work: Path, seed: int) -> Path:
    """The checkpoint (built once per --work folder)."""
    from lalm_export.demo.tiny import save_random_qwen2_audio

    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        save_random_qwen2_audio(work, TOWER, DECODER, seed)
    return checkpoint


def export(checkpoint: Path, variant: str, target: Path) -> dict[str, Any]:
    """`lalm-export --lalm` in a child process under /usr/bin/time: its seconds, peak memory and gate."""
    encoder, decoder = VARIANTS[variant]
    command = [sys.executable, "-m", "lalm_export.cli", "--lalm", str(checkpoint), "--output", str(target), "--force", "-q"]
    command += ["--encoder-precision", encoder, "--decoder-precision", decoder]
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    record: dict[str, Any] = {"family": "qwen2_audio", "precision": variant, "seconds": round(time.perf_counter() - start, 1)}
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    record["peak_rss_gib"] = round(int(peak.group(1)) / 2**20, 2) if peak else None
    if result.returncode != 0:
        record["error"] = next((line for line in result.stderr.splitlines() if line.startswith("lalm-export: error")), result.stderr[-300:])
        return record
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    record["parity_gate"] = "passed" if manifest["parity"]["passed"] else "failed"
    record["graph_mib"] = round(sum(f.stat().st_size for f in target.iterdir() if f.is_file()) / 2**20)
    return record


class EagerCheckpoint:
    """The checkpoint in transformers, as its users run it: its processor, then `generate`.
    Hooks on the audio tower and the projector time the encoder inside `generate`; a logits
    processor marks the first token (the end of the prefill)."""

    def __init__(self, checkpoint: Path, precision: str) -> None:
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.dtype = DTYPES[precision]
        self.model = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, dtype=self.dtype).eval()
        self.marks: dict[str, float] = {}
        self.model.model.audio_tower.register_forward_pre_hook(lambda *_: self.mark("tower"))
        self.model.model.multi_modal_projector.register_forward_hook(lambda *_: self.mark("projected"))

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def run(self, clip: np.ndarray, prompt: str, tokens: int) -> dict[str, Any]:
        from transformers import LogitsProcessor, LogitsProcessorList

        first: list[float] = []

        class FirstToken(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                if not first:
                    first.append(time.perf_counter())
                return scores

        start = time.perf_counter()
        inputs = self.processor(text=prompt, audio=clip, sampling_rate=16_000, return_tensors="pt")
        inputs["input_features"] = inputs["input_features"].to(self.dtype)
        front_end = time.perf_counter() - start
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, logits_processor=LogitsProcessorList([FirstToken()])
            )
        end = time.perf_counter()
        tower = self.marks["projected"] - self.marks["tower"]
        split = {"encoder_s": front_end + tower, "prefill_s": first[0] - start - front_end - tower, "decode_s": end - first[0]}
        return {"tokens": out[0, inputs["input_ids"].shape[1] :].numpy(), "total": end - start, **split}


def bundle_run(bundle: Path) -> Any:
    from runtime.api import load
    from runtime.generation import GenerationOptions

    runner = load(bundle)

    def run(clip: np.ndarray, tokens: int) -> dict[str, Any]:
        start = time.perf_counter()
        (result,) = runner.transcribe([clip], options=GenerationOptions(max_new_tokens=tokens, stop_at_eos=False))
        return {"tokens": np.array(result.tokens), "total": time.perf_counter() - start, **result.timings}

    return run


def run(work: Path, out: Path, seconds: float, tokens: int, repeats: int, seed: int, command: str) -> dict[str, Any]:
    from lalm_export.parity.signals import speech_like

    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731 - one line of progress
    say(f"pretrained-lalm: building the checkpoint in {work} (tower {TOWER}, decoder Qwen2.5-0.5B's sizes)")
    checkpoint = build_checkpoint(work, seed)
    exports, bundles = [], {}
    for variant in VARIANTS:
        say(f"pretrained-lalm: exporting {variant} with lalm-export --lalm (parity gate on)")
        record = export(checkpoint, variant, work / f"bundle-{variant}")
        say(f"      {record}")
        exports.append(record)
        if "error" not in record:
            bundles[variant] = work / f"bundle-{variant}"
    clip = speech_like(seconds, seed=seed)
    prompt = json.loads((work / "bundle-fp32" / "manifest.json").read_text())["extra"]["prompt"] if "fp32" in bundles else None
    references = eager_precisions("cpu")
    runners = {}
    for precision in references:
        eager = EagerCheckpoint(checkpoint, precision)
        runners[f"eager-{precision}"] = lambda eager=eager: eager.run(clip, prompt, tokens)
    for variant, bundle in bundles.items():
        onnx = bundle_run(bundle)
        runners[f"onnx-{variant}"] = lambda onnx=onnx: onnx(clip, tokens)
    say(f"pretrained-lalm: timing {', '.join(runners)}: 1 warm-up round, {repeats} timed, interleaved")
    with peak_rss() as memory:
        results = interleaved(runners, 1, repeats, on_run=lambda: say("      run done"))
    case = f"1 clip, {seconds:g} s of speech-like audio, {tokens} new tokens (EOS ignored), greedy"
    report = {
        **report_header(command),
        "settings": {
            "architecture": "qwen2_audio",
            "tower": TOWER,
            "decoder": DECODER,
            "audio_seconds": seconds,
            "new_tokens": tokens,
            "warmup_rounds": 1,
            "timed_rounds": repeats,
            "eager_references": list(references),
            "torch_threads": torch.get_num_threads(),
        },
        "exports": exports,
        "rows": lalm_rows(results, references, case, memory["peak_rss_gib"], VARIANTS, "qwen2_audio"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot = render_split_plot(report, out)
    (out / "report.md").write_text(render_markdown(report, plot) + "\n", encoding="utf-8")
    return report


def render_markdown(report: dict[str, Any], plot: str) -> str:
    settings, machine = report["settings"], report["machine"]
    lines = [
        "# A pretrained audio-LLM checkpoint of real sizes: eager `generate` against its bundles",
        "",
        f"Made by `{report['command']}` on {report['created']}.",
        "",
        f"- **Machine**: {machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['cores']} cores, {machine['memory_gib']} GiB.",
        "- **Libraries**: " + ", ".join(f"{k} {v}" for k, v in report["libraries"].items()) + ".",
        f"- **Model**: a Qwen2-Audio checkpoint with random weights: audio tower {settings['tower']} (Qwen2-Audio-7B's), decoder of "
        "Qwen2.5-0.5B's sizes (hidden 896, 24 layers, vocabulary 151,936; Qwen2-Audio-7B's 7B decoder does not fit an fp32 export in 24 GiB).",
        f"- **Settings**: {report['rows'][0]['case']}; eager: transformers `generate(**processor(text=prompt, audio=clip))`; bundle: "
        f"`runtime.api` `transcribe`; {settings['warmup_rounds']} warm-up round, {settings['timed_rounds']} timed rounds, interleaved; "
        f"torch threads {settings['torch_threads']}. The encoder's time includes the front end (log-mel). The checkpoint's tower runs the "
        "whole 30 s window, masked past the clip; the bundle's only up to the clip (the same features, checked by the gate).",
        "- Speedups are ratios of medians measured in this run (± the relative standard error of the per-round ratio).",
        "",
        "## End to end",
        "",
        *lalm_table(report["rows"], settings["eager_references"]),
        "",
        "## Exports",
        "",
        "| variant | seconds | peak RSS GiB | bundle MiB | parity gate |",
        "|---|---|---|---|---|",
        *[
            f"| {e['precision']} | {e['seconds']} | {e['peak_rss_gib']} | {e.get('graph_mib', '—')} | {e.get('parity_gate', 'error: ' + e.get('error', ''))} |"
            for e in report["exports"]
        ],
        "",
        f"![time split]({plot})",
    ]
    return "\n".join(lines)


def render_split_plot(report: dict[str, Any], folder: Path) -> str:
    """split.png: each variant's median end to end, stacked as encoder, prefill and decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(rows))
    for part, color in (("encoder_s", "tab:blue"), ("prefill_s", "tab:orange"), ("decode_s", "tab:green")):
        values = np.array([row["split_s"][part] for row in rows])
        ax.bar([row["variant"] for row in rows], values, bottom=bottom, label=part.removesuffix("_s"), color=color)
        bottom += values
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"Qwen2-Audio tower + 0.5B decoder: {report['settings']['audio_seconds']:g} s clip, {report['settings']['new_tokens']} tokens", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "split.png", dpi=110)
    plt.close(fig)
    return "split.png"
