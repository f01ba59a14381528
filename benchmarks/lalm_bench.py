"""The audio LLM in `python -m benchmarks run --families lalm`: a Whisper encoder of the
preset's size, a projector and the preset's decoder (random weights), exported with
`lalm-export --lalm` in each variant, timed end to end on one clip against the eager LALM in
fp32 and bf16 (on CUDA: fp32 and fp16), interleaved, the time split into encoder, prefill and
decode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.measure import interleaved, peak_rss, speedups_vs_eager, summary
from benchmarks.presets import eager_precisions, eager_references
from lalm_export.demo.tiny import save_random_checkpoint
from lalm_export.errors import LalmExportError
from lalm_export.export.lalm import export_lalm_bundle
from lalm_export.export.options import LalmExportOptions
from lalm_export.models import LLMDecoder, WhisperAudioEncoder
from lalm_export.models.lalm import LALM, ProjectorConfig
from lalm_export.parity.signals import speech_like
from runtime.api import load
from runtime.generation import GenerationOptions
from runtime.sessions import SessionOptions

LALM_FAMILY = "lalm"
NEW_TOKENS = 32
DOWNSAMPLE = 4
# variant -> (encoder precision, decoder precision): fp32 both; int8 both; int8 encoder with int4
# decoder (CPU); fp16 both (CUDA, or a CPU dry run of the GPU script)
VARIANTS = {"fp32": ("fp32", "fp32"), "int8": ("int8", "int8"), "int4": ("int8", "int4"), "fp16": ("fp16", "fp16")}


def build_lalm(settings: Any) -> Path:
    """The saved LALM of the preset's sizes (built once per --work folder)."""
    folder = settings.work / "lalm"
    if (folder / "lalm_config.json").is_file():
        return folder
    checkpoints = {}
    for family in ("whisper", "llm"):
        checkpoints[family] = settings.work / "checkpoints" / family
        if not (checkpoints[family] / "config.json").is_file():
            save_random_checkpoint(family, checkpoints[family], settings.preset.config(family), seed=settings.seed)
    torch.manual_seed(settings.seed)
    model = LALM(WhisperAudioEncoder(str(checkpoints["whisper"])), LLMDecoder(str(checkpoints["llm"])), ProjectorConfig(downsample=DOWNSAMPLE))
    model.save_pretrained(folder)
    return folder


def export_lalm_variants(settings: Any, exports: list[dict[str, Any]], say: Any) -> tuple[Path, dict[str, Path]]:
    import time

    folder = build_lalm(settings)
    bundles = {}
    for variant in settings.variants["decoder"]:
        if variant not in VARIANTS:
            continue
        encoder, decoder = VARIANTS[variant]
        say(f"lalm: exporting {variant} (encoder {encoder}, decoder {decoder}) with lalm-export --lalm (parity gate on)")
        target = settings.work / "bundles" / f"lalm-{variant}"
        start = time.perf_counter()
        record: dict[str, Any] = {"family": LALM_FAMILY, "precision": variant}
        try:
            manifest = export_lalm_bundle(
                LalmExportOptions(lalm=folder, output=target, force=True, encoder_precision=encoder, decoder_precision=decoder, device=settings.provider),
                quiet=True,
            )
            record["parity_gate"] = "passed" if manifest.parity.get("passed") else "failed"
            record["optimizations"] = manifest.optimizations
            bundles[variant] = target
        except LalmExportError as err:
            record["error"] = str(err)
            say(f"lalm: {variant} export failed: {err}")
        record["seconds"] = round(time.perf_counter() - start, 2)
        exports.append(record)
    return folder, bundles


def lalm_runs(settings: Any) -> int:
    variants = sum(1 for v in settings.variants["decoder"] if v in VARIANTS)
    return (len(eager_precisions(settings.provider)) + variants) * (settings.preset.warmup + settings.decoder_repeats)


def bench_lalm(settings: Any, folder: Path, bundles: dict[str, Path], bar: tqdm) -> list[dict[str, Any]]:
    preset = settings.preset
    clip = speech_like(preset.audio_seconds, seed=settings.seed)
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    model = LALM.from_pretrained(folder).to(settings.provider)
    model.set_inference_mode()
    eager = eager_references(model, settings.provider)

    runners = {}
    for precision, lalm in eager.items():
        runners[f"eager-{precision}"] = lambda lalm=lalm: eager_generation(lalm, clip, options)
    for variant, path in bundles.items():
        runner = load(path, SessionOptions(provider=settings.provider, threads=settings.preset.threads))
        runners[f"onnx-{variant}"] = lambda runner=runner: bundle_generation(runner, clip, options)
    with peak_rss() as memory:
        results = interleaved(runners, preset.warmup, settings.decoder_repeats, on_run=bar.update)
    case = f"1 clip, {preset.audio_seconds:g} s audio, {NEW_TOKENS} new tokens"
    rows = lalm_rows(results, tuple(eager), case, memory["peak_rss_gib"], VARIANTS, LALM_FAMILY)
    for row in rows:
        row["throughput"] = {"audio_seconds_per_s": round(preset.audio_seconds / row["latency_s"]["median"], 2)}
    return rows


def eager_generation(lalm: LALM, clip: np.ndarray, options: GenerationOptions) -> dict[str, Any]:
    """One timed run of the eager LALM on `clip`: its tokens, total seconds and encoder/prefill/decode split."""
    tokens, timings = lalm.generate_clip(clip, None, options)
    return {"tokens": np.array(tokens), "total": sum(timings.values()), **timings}


def bundle_generation(runner: Any, clip: np.ndarray, options: GenerationOptions) -> dict[str, Any]:
    """One timed run of a loaded audio-LLM bundle on `clip`, as `eager_generation` reports it."""
    (result,) = runner.transcribe([clip], options=options)
    return {"tokens": np.array(result.tokens), "total": sum(result.timings.values()), **result.timings}


def lalm_rows(
    results: dict[str, list[dict[str, Any]]], references: tuple[str, ...], case: str, memory_gib: float, variants: dict[str, tuple[str, str]], family: str
) -> list[dict[str, Any]]:
    """Audio-LLM rows of the report (`benchmarks.report.lalm_table`) from interleaved runs named
    `eager-P` and `onnx-VARIANT` (`variants`: VARIANT -> its encoder and decoder precisions), each
    run's tokens, total seconds and encoder/prefill/decode split; parity is the greedy agreement
    with eager fp32's first run, which the fp32 bundle must match."""
    reference = results["eager-fp32"][0]["tokens"]
    rows = []
    for name, runs in results.items():
        kind, precision = name.split("-", 1)
        same = runs[0]["tokens"] == reference
        figures = {"greedy_agreement": float(same.mean()), "first_divergence": None if same.all() else int(np.argmin(same))}
        bounds = {"greedy_agreement": {"min": 1.0}} if name == "onnx-fp32" else {}
        eager = {ref: [r["total"] for r in results[f"eager-{ref}"]] for ref in references}
        rows.append(
            {
                "family": family,
                "role": "lalm",
                "case": case,
                "batch": 1,
                "variant": name,
                "runtime": kind,
                "precision": precision,
                "parts": dict(zip(("encoder", "decoder"), variants[precision])) if kind == "onnx" else {"encoder": precision, "decoder": precision},
                "latency_s": summary([r["total"] for r in runs]),
                "split_s": {part: summary([r[part] for r in runs])["median"] for part in ("encoder_s", "prefill_s", "decode_s")},
                "speedups": speedups_vs_eager("end to end", eager, [r["total"] for r in runs]),
                "peak_rss_gib": memory_gib,
                "parity": {"figures": figures, "bounds": bounds, "passed": figures["greedy_agreement"] == 1.0 if bounds else None},
            }
        )
    return rows
