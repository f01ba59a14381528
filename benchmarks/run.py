"""`python -m benchmarks run`: every family, every exported variant, against eager PyTorch.

For each family: build a random checkpoint from the preset's config, export each variant
through the real `lalm-export` pipeline (parity gate included), load it through the
runtime, then time eager PyTorch (fp32 and bf16 on CPU, fp16 on CUDA) and every ONNX
variant on the same inputs, interleaved. Parity is measured against eager fp32."""

from __future__ import annotations

import json
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks.compare import bounds_breached
from benchmarks.lalm_bench import LALM_FAMILY, bench_lalm, export_lalm_variants, lalm_runs
from benchmarks.machine import measure_ceilings, report_header
from benchmarks.measure import interleaved, peak_rss, speedups_vs_eager, summary, timed
from benchmarks.presets import GPU_VARIANTS, PRESETS, Preset, eager_precisions, eager_references
from lalm_export.demo.tiny import save_random_checkpoint
from lalm_export.errors import LalmExportError
from lalm_export.export.component import ExportOptions, export_bundle
from lalm_export.models.eager import EagerDecoderBackend, full_fp32
from lalm_export.models.families import FAMILIES, get_family
from lalm_export.models.loading import load_family_model
from lalm_export.parity.bounds import gate_tolerance
from lalm_export.parity.report import OutputError
from lalm_export.parity.signals import speech_like
from lalm_export.precision.specs import SPECS
from runtime.api import load
from runtime.audio import features_for
from runtime.generation import GenerationOptions, generate
from runtime.manifest import read_manifest
from runtime.sessions import SessionOptions, cuda_provider_options

RESULTS_SCHEMA = 1
BENCH_FAMILIES = (*FAMILIES, LALM_FAMILY)  # every registry family, then the audio LLM built from two of them
CEILING_FOR = {"fp32": "fp32_gemm_gflops", "bf16": "bf16_gemm_gflops", "int8": "int8_gemm_gops", "fp16": "fp16_gemm_gflops", "int4": "int8_gemm_gops"}


@dataclass(frozen=True)
class RunSettings:
    preset: Preset
    families: tuple[str, ...]
    variants: dict[str, tuple[str, ...]]  # role -> precisions to export
    provider: str  # cpu or cuda: eager device and ONNX Runtime provider
    work: Path
    repeats: int
    decoder_repeats: int
    seed: int = 0
    decoder_graph: str = "auto"  # lalm-export --decoder-graph for the decoder's exports

    def to_dict(self) -> dict[str, Any]:
        p = self.preset
        return {
            "preset": p.name,
            "preset_description": p.description,
            "families": list(self.families),
            "variants": {role: list(v) for role, v in self.variants.items()},
            "provider": self.provider,
            "decoder_graph": self.decoder_graph,
            "eager_references": list(eager_precisions(self.provider)),
            "audio_seconds": p.audio_seconds,
            "encoder_batches": list(p.encoder_batches),
            "prompt_tokens": p.prompt_tokens,
            "new_tokens": p.new_tokens,
            "decoder_batch": 1,
            "warmup_rounds": p.warmup,
            "timed_rounds": {"encoder": self.repeats, "decoder": self.decoder_repeats},
            "order": "interleaved: every variant once per round",
            "torch_threads": torch.get_num_threads(),
            "ort_threads": p.threads or "default (one per physical core)",
        }


def base_precision(variant: str) -> str:
    return variant.split("-")[0]


def variant_options(variant: str, options: ExportOptions, calibration: Path | None = None) -> ExportOptions:
    """A variant name (a precision, then -gptq, -self for GPTQ on the model's own samples
    instead of `calibration`, -bN for the int4 block size and/or -h4 for a 4-bit lm_head) as
    export options."""
    precision, *extras = variant.split("-")
    options = replace(options, precision=precision)
    for extra in extras:
        if extra == "gptq":
            options = replace(options, int4=replace(options.int4, method="gptq", calibration=calibration))
        elif extra == "self":
            options = replace(options, int4=replace(options.int4, calibration=None))
        elif extra == "h4":
            options = replace(options, int4=replace(options.int4, lm_head="int4"))
        else:
            options = replace(options, int4=replace(options.int4, block_size=int(extra.removeprefix("b"))))
    return options


def parity_bounds(role: str, variant: str) -> dict[str, dict[str, float]]:
    """The export's parity gate at its defaults (no --min-cosine here): {figure: {"min"|"max": bound}}."""
    return gate_tolerance(base_precision(variant), role).figure_bounds(greedy=role == "decoder")


def parity_passes(figures: dict[str, Any], bounds: dict[str, dict[str, float]]) -> bool:
    return not bounds_breached(figures, bounds)


def output_figures(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    error = OutputError()
    error.update(reference, candidate)
    return error.to_dict()


def export_variant(family: str, checkpoint: Path, precision: str, folder: Path, provider: str, decoder_graph: str = "auto") -> dict[str, Any]:
    graph = decoder_graph if get_family(family).role == "decoder" else "auto"
    options = variant_options(precision, ExportOptions(family=family, model=str(checkpoint), output=folder, device=provider, force=True, decoder_graph=graph))
    start = time.perf_counter()
    try:
        manifest = export_bundle(options, quiet=True)
    except LalmExportError as err:
        return {"family": family, "precision": precision, "error": str(err), "seconds": round(time.perf_counter() - start, 2)}
    except Exception as err:  # noqa: BLE001 - a crash (CUDA, ONNX Runtime) is recorded; the other variants still run
        traceback.print_exc()
        return {"family": family, "precision": precision, "error": f"{type(err).__name__}: {err}", "seconds": round(time.perf_counter() - start, 2)}
    return {
        "family": family,
        "precision": precision,
        "seconds": round(time.perf_counter() - start, 2),
        "parity_gate": "passed" if manifest.parity.get("passed") else "failed",
        "optimizations": manifest.optimizations,
        **({"decoder_graph": manifest.extra["decoder_graph"]} if "decoder_graph" in manifest.extra else {}),
        "graph_mib": round(sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 2**20, 1),
    }


def eager_models(family: str, checkpoint: Path, provider: str) -> dict[str, torch.nn.Module]:
    return eager_references(load_family_model(get_family(family), str(checkpoint)).float().eval().to(provider), provider)


def count_flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def achieved(flops: int, seconds: float, precision: str, ceilings: dict[str, float]) -> dict[str, Any]:
    rate = flops / seconds / 1e9
    key = CEILING_FOR.get(base_precision(precision))
    ceiling = ceilings.get(key) if key else None
    return {"gflops_per_s": round(rate, 1), "ceiling": key, "ceiling_pct": round(100 * rate / ceiling, 1) if ceiling else None}


def encoder_input(family: str, preset: Preset, batch: int, feature_config: dict[str, Any], seed: int) -> np.ndarray:
    """Speech-like clips of the preset's length (Whisper: log-mel of its 30 s window)."""
    spec = get_family(family)
    clips = [speech_like(preset.audio_seconds, seed=seed + i) for i in range(batch)]
    return np.stack([features_for(spec.input_kind, clip, feature_config) for clip in clips]).astype(np.float32)


def encoder_calls(input_name: str, x: np.ndarray, provider: str):
    """The timed calls: eager module and ONNX Runtime on the same input, which on CUDA is put
    on the device once (torch tensor / OrtValue) with outputs left there, so neither side
    times host transfers; each call returns when its work is done."""
    import onnxruntime as ort

    device_input = torch.from_numpy(x).to(provider)
    ort_input = ort.OrtValue.ortvalue_from_numpy(x, provider, 0) if provider == "cuda" else None

    def eager_run(model: torch.nn.Module) -> torch.Tensor:
        weight = next(model.parameters())
        with torch.no_grad():
            out = model(**{input_name: device_input.to(weight.dtype)}).last_hidden_state
        if provider == "cuda":
            torch.cuda.synchronize()
        return out

    def onnx_run(runner) -> Any:
        if ort_input is not None:
            return runner.run_on_device(ort_input)[0]
        return runner.session.run(["last_hidden_state"], {runner.input_name: x})[0]

    return eager_run, onnx_run


def host_array(output: Any) -> np.ndarray:
    """A float32 host copy of an eager tensor, an OrtValue or an array."""
    if isinstance(output, torch.Tensor):
        return output.float().cpu().numpy()
    if hasattr(output, "numpy"):
        return np.asarray(output.numpy(), dtype=np.float32)
    return np.asarray(output, dtype=np.float32)


def bench_encoder(settings: RunSettings, family: str, bundles: dict[str, Path], ceilings: dict[str, float], bar: tqdm) -> list[dict[str, Any]]:
    spec = get_family(family)
    checkpoint = settings.work / "checkpoints" / family
    models = eager_models(family, checkpoint, settings.provider)
    runners_onnx = {p: load(path, SessionOptions(provider=settings.provider, threads=settings.preset.threads)) for p, path in bundles.items()}
    feature_config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    rows = []
    for batch in settings.preset.encoder_batches:
        x = encoder_input(family, settings.preset, batch, feature_config, settings.seed)
        seconds_of_audio = batch * (30.0 if not spec.dynamic_length else settings.preset.audio_seconds)
        case = f"batch {batch}, {seconds_of_audio / batch:g} s"

        eager_run, onnx_run = encoder_calls(spec.input_name, x, settings.provider)
        sample = settings.preset.min_sample_s
        runners = {f"eager-{p}": timed(lambda m=m, run=eager_run: run(m), sample) for p, m in models.items()}
        runners.update({f"onnx-{p}": timed(lambda r=r, run=onnx_run: run(r), sample) for p, r in runners_onnx.items()})
        times = interleaved(runners, settings.preset.warmup, settings.repeats, on_run=bar.update)
        reference = host_array(eager_run(models["fp32"]))
        flops = count_flops(lambda run=eager_run: run(models["fp32"]))
        for name, runs in times.items():
            kind, precision = name.split("-", 1)
            with peak_rss() as memory:
                output = host_array(eager_run(models[precision]) if kind == "eager" else onnx_run(runners_onnx[precision]))
            figures = output_figures(reference, output)
            bounds = {} if kind == "eager" else parity_bounds("encoder", precision)
            latency = summary(runs)
            rows.append(
                {
                    "family": family,
                    "role": "encoder",
                    "case": case,
                    "batch": batch,
                    "variant": name,
                    "runtime": kind,
                    "precision": precision,
                    "latency_s": latency,
                    "throughput": {"audio_seconds_per_s": round(seconds_of_audio / latency["median"], 2)},
                    "speedups": speedups_vs_eager("latency", {ref: times[f"eager-{ref}"] for ref in models}, runs),
                    "flops": flops,
                    "achieved": achieved(flops, latency["median"], precision, ceilings),
                    "peak_rss_gib": memory["peak_rss_gib"],
                    "parity": {"figures": figures, "bounds": bounds, "passed": parity_passes(figures, bounds) if bounds else None},
                }
            )
    return rows


def weight_bytes_per_token(graph: Path) -> int:
    """Bytes of weights a decode step reads: every initializer except tables only gathered
    from (the embedding, and GroupQueryAttention's rotary caches: one row per token)."""
    proto = onnx.load(str(graph), load_external_data=False)
    producers = {out: node for node in proto.graph.node for out in node.output}
    gathered, table_nodes = set(), set()
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            table_nodes.add(id(node))
            gathered.update(node.input[7:9])  # cos_cache, sin_cache: read at the step's position
            continue
        if node.op_type != "Gather":
            continue
        table_nodes.add(id(node))
        name = node.input[0]
        # A fused graph gathers its tied embedding from Transpose(lm_head weight): ONNX Runtime
        # folds that into a table at load; a step still reads one row of it.
        while name in producers and producers[name].op_type in ("Transpose", "Cast", "Identity"):
            table_nodes.add(id(producers[name]))
            name = producers[name].input[0]
        gathered.add(name)
    used_elsewhere = {name for n in proto.graph.node if id(n) not in table_nodes for name in n.input}
    total = 0
    for tensor in proto.graph.initializer:
        if tensor.name in gathered and tensor.name not in used_elsewhere:
            continue
        external = {e.key: e.value for e in tensor.external_data}
        if "length" in external:
            total += int(external["length"])
        else:
            total += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total


def eager_weight_bytes_per_token(model: torch.nn.Module) -> int:
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embedding.numel() * embedding.element_size()


def forced_top1(backend, prompt: np.ndarray, reference: np.ndarray) -> float:
    """Top-1 agreement under teacher forcing: feed the eager fp32 tokens, compare each argmax."""
    logits = backend.prefill(prompt, np.ones_like(prompt))
    hits = []
    for token in reference:
        hits.append(int(logits.argmax(-1)[0]) == int(token))
        logits = backend.decode_step(np.array([token]))
    return float(np.mean(hits))


def bench_decoder(settings: RunSettings, bundles: dict[str, Path], ceilings: dict[str, float], bar: tqdm) -> list[dict[str, Any]]:
    preset = settings.preset
    checkpoint = settings.work / "checkpoints" / "llm"
    models = eager_models("llm", checkpoint, settings.provider)
    backends: dict[str, Any] = {f"eager-{p}": EagerDecoderBackend(m) for p, m in models.items()}
    for precision, path in bundles.items():
        backends[f"onnx-{precision}"] = load(path, SessionOptions(provider=settings.provider, threads=settings.preset.threads)).backend
    vocab = int(models["fp32"].config.vocab_size)
    prompt = np.random.default_rng(settings.seed).integers(3, min(vocab, 32_000), size=(1, preset.prompt_tokens))
    options = GenerationOptions(max_new_tokens=preset.new_tokens)

    def run(backend) -> dict[str, Any]:
        marks: list[float] = []
        start = time.perf_counter()
        tokens = generate(backend, prompt, np.ones_like(prompt), options, on_step=lambda _: marks.append(time.perf_counter()))
        end = time.perf_counter()
        decode_seconds = marks[-1] - marks[0]
        return {"total": end - start, "ttft": marks[0] - start, "tps": (len(marks) - 1) / decode_seconds if decode_seconds else 0.0, "tokens": tokens[0]}

    results = interleaved({n: (lambda b=b: run(b)) for n, b in backends.items()}, preset.warmup, settings.decoder_repeats, on_run=bar.update)
    reference_tokens = results["eager-fp32"][0]["tokens"]
    reference_logits = backends["eager-fp32"].prefill(prompt, np.ones_like(prompt))
    fp32_model = models["fp32"]
    prefill_flops = count_flops(lambda: EagerDecoderBackend(fp32_model).prefill(prompt, np.ones_like(prompt)))
    rows = []
    for name, runs in results.items():
        kind, precision = name.split("-", 1)
        backend = backends[name]
        if kind == "eager":
            weight_bytes = eager_weight_bytes_per_token(models[precision])
        else:
            weight_bytes = weight_bytes_per_token(bundles[precision] / read_manifest(bundles[precision]).graphs["model"].path)
        tokens = runs[0]["tokens"]
        same = tokens == reference_tokens
        with peak_rss() as memory:
            logits = backend.prefill(prompt, np.ones_like(prompt))
        figures = {
            **output_figures(reference_logits, logits),
            "greedy_agreement": float(same.mean()),
            "first_divergence": None if same.all() else int(np.argmin(same)),
            "top1_agreement": forced_top1(backend, prompt, reference_tokens),
        }
        bounds = {} if kind == "eager" else parity_bounds("decoder", precision)
        ttft = summary([r["ttft"] for r in runs])
        tps = summary([r["tps"] for r in runs])
        floor = ceilings["memory_bandwidth_gbs"] * 1e9 / weight_bytes
        eager = {ref: results[f"eager-{ref}"] for ref in models}
        speedups = {
            **speedups_vs_eager("decode tok/s", {ref: [r["tps"] for r in rs] for ref, rs in eager.items()}, [r["tps"] for r in runs], higher_is_better=True),
            **speedups_vs_eager("TTFT", {ref: [r["ttft"] for r in rs] for ref, rs in eager.items()}, [r["ttft"] for r in runs]),
        }
        rows.append(
            {
                "family": "llm",
                "role": "decoder",
                "case": f"batch 1, prompt {preset.prompt_tokens} + {preset.new_tokens} new tokens",
                "batch": 1,
                "variant": name,
                "runtime": kind,
                "precision": precision,
                "latency_s": summary([r["total"] for r in runs]),
                "ttft_s": ttft,
                "decode_tokens_per_s": tps,
                "throughput": {"tokens_per_s": round(tps["median"], 2)},
                "speedups": speedups,
                "flops": prefill_flops,
                "achieved": achieved(prefill_flops, ttft["median"], precision, ceilings),
                "weight_bytes_per_token": weight_bytes,
                "bandwidth_floor": {"tokens_per_s": round(floor, 2), "reached_pct": round(100 * tps["median"] / floor, 1)},
                "peak_rss_gib": memory["peak_rss_gib"],
                "parity": {"figures": figures, "bounds": bounds, "passed": parity_passes(figures, bounds) if bounds else None},
            }
        )
    return rows


def total_runs(settings: RunSettings) -> int:
    eager = len(eager_precisions(settings.provider))
    rounds = settings.preset.warmup
    count = 0
    for family in settings.families:
        if family == LALM_FAMILY:
            count += lalm_runs(settings)
            continue
        role = get_family(family).role
        variants = eager + len(settings.variants[role])
        if role == "encoder":
            count += len(settings.preset.encoder_batches) * variants * (rounds + settings.repeats)
        else:
            count += variants * (rounds + settings.decoder_repeats)
    return count


def run_benchmarks(settings: RunSettings, command: str, quiet: bool = False, on_family_done: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every family in turn. A family whose timing fails is recorded as a failed export and the
    run goes on; `on_family_done` receives the results so far after each family, so a run cut
    short (a time limit on a lent GPU) still leaves what it measured."""
    say = (lambda text: None) if quiet else (lambda text: tqdm.write(text, file=sys.stderr))
    if settings.preset.threads:
        torch.set_num_threads(settings.preset.threads)
    say("measuring this machine's ceilings (GEMM, int8 MatMul, memory bandwidth) ...")
    results = {
        "schema": RESULTS_SCHEMA,
        **report_header(command),
        "settings": {**settings.to_dict(), "cuda_provider_options": cuda_provider_options() if settings.provider == "cuda" else None},
        "ceilings": measure_ceilings(settings.provider),
        "exports": [],
        "rows": [],
    }
    # Eager fp32 without TF32, as ONNX Runtime runs (use_tf32=0): the same arithmetic on both sides.
    with full_fp32(), tqdm(total=total_runs(settings), desc="benchmark", unit="run", disable=quiet, file=sys.stderr) as bar:
        for family in settings.families:
            if family == LALM_FAMILY:
                folder, bundles = export_lalm_variants(settings, results["exports"], say)
            else:
                bundles = export_family(settings, family, results["exports"], say)
            say(f"{family}: timing eager and ONNX Runtime, interleaved")
            start = time.perf_counter()
            try:
                if family == LALM_FAMILY:
                    results["rows"] += bench_lalm(settings, folder, bundles, bar)
                elif get_family(family).role == "encoder":
                    results["rows"] += bench_encoder(settings, family, bundles, results["ceilings"], bar)
                else:
                    results["rows"] += bench_decoder(settings, bundles, results["ceilings"], bar)
            except Exception as err:  # noqa: BLE001 - recorded as a failure; the other families still run
                traceback.print_exc()
                say(f"{family}: timing failed: {err}")
                elapsed = round(time.perf_counter() - start, 2)
                results["exports"].append({"family": family, "precision": "timing", "error": f"{type(err).__name__}: {err}", "seconds": elapsed})
            results["rows"] += failed_rows(family, results["rows"], results["exports"])
            if on_family_done is not None:
                on_family_done(results)
    return results


def failed_rows(family: str, rows: list[dict[str, Any]], exports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per case for each variant of `family` whose export failed (the parity gate
    refused it, or it crashed), so that tables and plots show it failed instead of leaving it out."""
    timed = [r for r in rows if r["family"] == family]
    if not timed:
        return []
    cases = list(dict.fromkeys((r["case"], r["batch"]) for r in timed))
    role = timed[0]["role"]
    return [
        {
            "family": family,
            "role": role,
            "case": case,
            "batch": batch,
            "variant": f"onnx-{export['precision']}",
            "runtime": "onnx",
            "precision": export["precision"],
            "failed": export["error"],
            "speedups": {},
            "parity": {"figures": {}, "bounds": {}, "passed": False},
        }
        for export in exports
        if export["family"] == family and "error" in export and export["precision"] != "timing"
        for case, batch in cases
    ]


def failed_variants(results: dict[str, Any]) -> list[str]:
    """`family variant` of every variant that failed its export or the benchmark's parity bounds."""
    failed = [f"{r['family']} {r['variant']}" for r in results["rows"] if r["parity"]["passed"] is False]
    failed += [f"{e['family']} {e['precision']}" for e in results["exports"] if e["precision"] == "timing"]
    return list(dict.fromkeys(failed))


def export_family(settings: RunSettings, family: str, exports: list[dict[str, Any]], say: Callable[[str], None]) -> dict[str, Path]:
    """Build the family's random checkpoint (once per --work folder) and export each variant;
    returns the bundles that exported, and appends a record of every export to `exports`."""
    checkpoint = settings.work / "checkpoints" / family
    if not (checkpoint / "config.json").is_file():
        say(f"{family}: building a random checkpoint ({settings.preset.name} preset)")
        save_random_checkpoint(family, checkpoint, settings.preset.config(family), seed=settings.seed)
    bundles = {}
    for precision in settings.variants[get_family(family).role]:
        say(f"{family}: exporting {precision} with lalm-export (parity gate on)")
        folder = settings.work / "bundles" / f"{family}-{precision}"
        record = export_variant(family, checkpoint, precision, folder, settings.provider, settings.decoder_graph)
        exports.append(record)
        if "error" in record:
            say(f"{family}: {precision} export failed: {record['error']}")
        else:
            bundles[precision] = folder
    return bundles


def make_settings(
    preset: str, families: list[str] | None, variants: list[str] | None, provider: str, work: Path, repeats: int | None, decoder_graph: str = "auto"
) -> RunSettings:
    """Settings for a run; `variants` are precisions, each exported for the roles and provider it suits."""
    chosen = PRESETS[preset]
    wanted = GPU_VARIANTS if provider == "cuda" else chosen.variants
    if variants:
        wanted = {
            role: tuple(v for v in variants if role in SPECS[base_precision(v)].roles and provider in SPECS[base_precision(v)].devices)
            for role in ("encoder", "decoder")
        }
    return RunSettings(
        preset=chosen,
        families=tuple(families or BENCH_FAMILIES),
        variants=wanted,
        provider=provider,
        work=work,
        repeats=repeats or chosen.repeats,
        decoder_repeats=repeats or chosen.decoder_repeats,
        decoder_graph=decoder_graph,
    )


def command_line(argv: list[str]) -> str:
    return "python -m benchmarks " + shlex.join(argv)
