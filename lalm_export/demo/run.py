"""The built-in example, end to end on tiny models (no hub, about four minutes on 2 cores):
build checkpoints, train LoRA adapters on synthetic data, save and reload them, export
with the parity gate, time ONNX Runtime against eager PyTorch, serve the bundles, and train,
export and run an audio LLM on DTMF key tones. With --spoken-digits (and espeak-ng
installed) an audio LLM also learns spoken digits (about ten more minutes).

    python -m lalm_export.demo [--out demo-output] [--spoken-digits]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lalm_export.cli import quiet_libraries  # noqa: E402
from lalm_export.demo.tiny import build_tiny_checkpoint, tiny_input  # noqa: E402
from lalm_export.errors import OptionsError, ParityError  # noqa: E402
from lalm_export.export.component import ExportOptions, export_bundle  # noqa: E402
from lalm_export.models import ENCODER_CLASSES, LLMDecoder  # noqa: E402
from lalm_export.models.families import FAMILIES  # noqa: E402
from lalm_export.parity.signals import speech_like  # noqa: E402
from runtime.cpu import describe_cpu  # noqa: E402
from runtime.generation import GenerationOptions, generate  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.ort_backends import decoder_backend  # noqa: E402
from runtime.sessions import SessionOptions, create_session  # noqa: E402


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def export_reduced(options: ExportOptions) -> Manifest | str:
    """A reduced-precision export, or the gate's reason for refusing it: the demo reports a
    refusal in its tables and goes on (what a precision loses depends on the CPU's kernels)."""
    try:
        return export_bundle(options, quiet=True)
    except ParityError as err:
        return str(err).splitlines()[0]


def count_trainable(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}"


def trainable_table(checkpoints: dict[str, Path]) -> str:
    modes = ({}, {"finetune": True}, {"use_lora": True}, {"use_qlora": True})
    rows = [[family, *(count_trainable(cls(str(checkpoints[family]), **kw)) for kw in modes)] for family, cls in ENCODER_CLASSES.items()]
    llm = str(checkpoints["llm"])
    rows.append(
        ["llm", count_trainable(LLMDecoder(llm)), "n/a", count_trainable(LLMDecoder(llm, use_lora=True)), count_trainable(LLMDecoder(llm, use_qlora=True))]
    )
    return table(["family", "frozen", "finetune", "LoRA", "QLoRA"], rows)


def train_encoder_lora(checkpoint: Path, steps: int) -> tuple[torch.nn.Module, list[float]]:
    """LoRA on Wav2Vec2: pull the final features of synthetic tones towards a fixed target."""
    torch.manual_seed(0)
    model = ENCODER_CLASSES["wav2vec2"](str(checkpoint), use_lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    model.set_training_mode()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    t = torch.arange(16_000) / 16_000
    audio = torch.stack([0.3 * torch.sin(2 * torch.pi * f * t) for f in (220.0, 440.0)])
    target = torch.linspace(-1, 1, model.get_hidden_size())
    losses = []
    for _ in range(steps):
        loss = (model(audio)[-1].mean(dim=1) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, losses


def train_decoder_lora(checkpoint: Path, steps: int) -> tuple[LLMDecoder, list[float]]:
    torch.manual_seed(0)
    model = LLMDecoder(str(checkpoint), use_lora=True, lora_dropout=0.0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = model.tokenizer("the capital of france is paris. one two three four five", return_tensors="pt")
    losses = []
    for _ in range(steps):
        loss = model(batch.input_ids, batch.attention_mask, labels=batch.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, losses


def median_seconds(fn, warmup: int = 3, repeats: int = 15) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


DEMO_MARK = ".lalm-export-demo"  # marks a folder the demo wrote: the next run may replace it


def prepare_out(folder: Path) -> None:
    """An empty `folder` for this run: one an earlier run wrote is replaced; any other folder
    that holds files is refused (the demo never deletes what it did not write)."""
    if folder.exists() and not folder.is_dir():
        raise OptionsError(f"--out {folder} is a file; pass a folder")
    if folder.exists() and any(folder.iterdir()):
        if not (folder / DEMO_MARK).is_file():
            raise OptionsError(f"--out {folder} holds files the demo did not write; pass a new or empty folder, or remove this one")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARK).write_text("written by python -m lalm_export.demo; its next run with this --out replaces the folder\n")


def steps_count(text: str) -> int:
    """argparse type: a number of training steps (1 or more)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, 1 or more, not {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lalm_export.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="scratch folder of the demo (a new or empty one, or one an earlier run wrote, which is replaced)"
    )
    parser.add_argument("--steps", type=steps_count, default=20, help="LoRA training steps")
    parser.add_argument(
        "--lalm-steps", type=steps_count, default=1200, help="training steps of the audio LLM on DTMF key tones (default: 1200, about 3 minutes)"
    )
    parser.add_argument(
        "--spoken-digits",
        action="store_true",
        help="also train an audio LLM on digits spoken by espeak-ng (needs espeak-ng on PATH; about ten minutes more)",
    )
    parser.add_argument("--spoken-steps", type=steps_count, default=3000, help="training steps of the spoken-digits audio LLM (default: 3000)")
    args = parser.parse_args(argv)
    from lalm_export.demo.spoken_digits import espeak

    try:
        if args.spoken_digits:
            espeak()
        prepare_out(args.out)
    except OptionsError as err:
        print(f"lalm_export.demo: error: {err}", file=sys.stderr)
        return 1
    quiet_libraries()
    root = args.out
    say = lambda s="": print(s, flush=True)  # noqa: E731

    say("== 1. tiny checkpoints (random weights, saved with save_pretrained)")
    checkpoints = {f: build_tiny_checkpoint(f, root / "checkpoints" / f, seed=i) for i, f in enumerate(FAMILIES)}
    say(f"   {', '.join(str(p) for p in checkpoints.values())}\n")
    say("== 2. trainable parameters per mode")
    say(trainable_table(checkpoints) + "\n")

    say(f"== 3. LoRA on Wav2Vec2, {args.steps} steps on synthetic tones")
    encoder, losses = train_encoder_lora(checkpoints["wav2vec2"], args.steps)
    say(f"   loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    encoder.save_lora_weights(root / "adapters" / "wav2vec2")
    reloaded = ENCODER_CLASSES["wav2vec2"](str(checkpoints["wav2vec2"]), use_lora=True, lora_r=8, lora_alpha=16)
    reloaded.load_lora_weights(root / "adapters" / "wav2vec2")
    x = tiny_input("wav2vec2", batch=1, seconds=2.0, seed=1)
    encoder.set_inference_mode()
    reloaded.set_inference_mode()
    same = torch.equal(encoder.inference(x)[-1], reloaded.inference(x)[-1])
    say(f"   saved to {root / 'adapters' / 'wav2vec2'}; reloaded adapter gives identical outputs: {same}\n")

    say(f"== 4. LoRA on the LLM decoder, {args.steps} steps")
    decoder, losses = train_decoder_lora(checkpoints["llm"], args.steps)
    say(f"   loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    decoder.save_lora_weights(root / "adapters" / "llm")
    say()

    say("== 5. export with the parity gate (lalm-export)")
    encoder_bundle = export_bundle(
        ExportOptions(
            family="wav2vec2",
            model=str(checkpoints["wav2vec2"]),
            adapter=root / "adapters" / "wav2vec2",
            output=root / "bundles" / "wav2vec2",
            all_hidden_states=True,
        ),
        quiet=True,
    )
    decoder_bundle = export_bundle(
        ExportOptions(family="llm", model=str(checkpoints["llm"]), adapter=root / "adapters" / "llm", output=root / "bundles" / "llm"), quiet=True
    )
    int8_bundle = export_reduced(
        ExportOptions(
            family="wav2vec2",
            model=str(checkpoints["wav2vec2"]),
            adapter=root / "adapters" / "wav2vec2",
            output=root / "bundles" / "wav2vec2-int8",
            precision="int8",
        )
    )
    int4_bundle = export_reduced(
        ExportOptions(family="llm", model=str(checkpoints["llm"]), adapter=root / "adapters" / "llm", output=root / "bundles" / "llm-int4", precision="int4")
    )
    rows = []
    bundles = (("wav2vec2 (LoRA merged)", encoder_bundle), ("wav2vec2 int8", int8_bundle), ("llm (LoRA merged)", decoder_bundle), ("llm int4", int4_bundle))
    for name, manifest in bundles:
        if isinstance(manifest, str):
            rows.append([name, "refused by the gate", "", "", "", manifest])
            continue
        tolerance = manifest.parity["tolerance"]
        bound = f"relative <= {tolerance['relative']:g}" if tolerance["cosine"] is None else f"cosine >= {tolerance['cosine']:g}"
        for output, err in manifest.parity["outputs"].items():
            if output.startswith("hidden_states.") and output != "hidden_states.0":
                continue
            rows.append([name, output, f"{err['max_abs']:.2e}", f"{err['relative']:.2e}", f"{err['cosine']:.6f}", bound])
        if manifest.parity["greedy"]:
            g = manifest.parity["greedy"]
            gated = "all agree" if tolerance["greedy_agreement"] else "recorded"
            rows.append([name, f"greedy tokens ({g['steps']} steps)", "", "", f"{g['agreement']:.0%} agree", gated])
    say(table(["bundle", "output", "max-abs", "relative", "cosine", "gate"], rows))
    if not isinstance(int8_bundle, str):
        say(f"   int8 recipe: {int8_bundle.extra['int8']['weight_range']} weights for {int8_bundle.extra['int8']['target_cpu']} int8 kernels (this CPU's)")
    say()

    say("== 6. speed: eager PyTorch vs ONNX Runtime (CPU), same inputs, median of 15 after 3 warm-ups")
    merged = encoder.encoder.merge_and_unload().eval()
    audio = tiny_input("wav2vec2", batch=1, seconds=5.0, seed=2)
    with torch.no_grad():
        eager_s = median_seconds(lambda: merged(input_values=audio))
    encoder_rows = []
    for label, folder, manifest in (("fp32", "wav2vec2", encoder_bundle), ("int8", "wav2vec2-int8", int8_bundle)):
        if isinstance(manifest, str):
            encoder_rows.append([f"wav2vec2 (tiny), ONNX {label}", "5 s audio, batch 1", f"{eager_s * 1e3:.2f}", "refused by the gate", ""])
            continue
        session = create_session(root / "bundles" / folder / "model.onnx", SessionOptions(provider="cpu"))
        ort_s = median_seconds(lambda s=session: s.run(None, {"input_values": audio.numpy()}))
        encoder_rows.append([f"wav2vec2 (tiny), ONNX {label}", "5 s audio, batch 1", f"{eager_s * 1e3:.2f}", f"{ort_s * 1e3:.2f}", f"{eager_s / ort_s:.2f}x"])
    decoder.eval()
    prompt = decoder.tokenizer("the capital of france is", return_tensors="pt").input_ids
    with torch.no_grad():
        eager_gen = median_seconds(lambda: decoder.generate(input_ids=prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False), 1, 5)
    ids, ones = prompt.numpy(), np.ones_like(prompt.numpy())
    decoder_rows = []
    for label, folder, manifest in (("fp32", "llm", decoder_bundle), ("int4", "llm-int4", int4_bundle)):
        if isinstance(manifest, str):
            decoder_rows.append([f"llm (tiny), ONNX {label}", "16 greedy tokens", f"{eager_gen * 1e3:.1f}", "refused by the gate", ""])
            continue
        backend = decoder_backend(create_session(root / "bundles" / folder / "model.onnx", SessionOptions(provider="cpu")))
        ort_gen = median_seconds(lambda b=backend: generate(b, ids, ones, GenerationOptions(max_new_tokens=16)), 1, 5)
        decoder_rows.append([f"llm (tiny), ONNX {label}", "16 greedy tokens", f"{eager_gen * 1e3:.1f}", f"{ort_gen * 1e3:.1f}", f"{eager_gen / ort_gen:.2f}x"])
        if label == "fp32":
            tokens = generate(backend, ids, ones, GenerationOptions(max_new_tokens=16))[0]
    say(table(["graph", "input", "eager fp32 (ms)", "ONNX Runtime (ms)", "speedup"], encoder_rows + decoder_rows))
    say(f"   ONNX fp32 greedy text: {decoder.tokenizer.decode(tokens)!r}")
    cpu = describe_cpu()
    say(
        f"   machine: {cpu['model']} ({', '.join(cpu['flags']) or 'no AVX2'}; int8 kernels: {cpu['int8_kernels']}), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); tiny models: real sizes are in benchmarks/results/base/report.md\n"
    )

    say("== 7. serve the bundles with the torch-free runtime")
    run_runtime(root)

    say(f"\n== 8. the audio LLM: DTMF key tones -> Whisper-style encoder -> projector -> Llama-style decoder -> the keys as text ({args.lalm_steps} steps)")
    run_lalm(root, dtmf_task(), args.lalm_steps, say)
    if args.spoken_digits:
        say(f"\n== 9. the audio LLM: digits spoken by espeak-ng -> the same pipeline -> the digits as text ({args.spoken_steps} steps)")
        run_lalm(root, spoken_digits_task(), args.spoken_steps, say)
    else:
        say("\n(section 9, an audio LLM on digits spoken by espeak-ng, runs with --spoken-digits)")
    say(f"\nbundles are in {root / 'bundles'}; each holds manifest.json with its parity report")
    return 0


@dataclass(frozen=True)
class AudioTask:
    """An audio -> text task the demo trains an LALM on: its name (folders and files), what its
    labels count ("keys"), how the training goes (for the progress line), and its parts."""

    name: str
    unit: str
    recipe: str
    build: Callable[[Path], Any]
    train: Callable[[Any, int, Callable[[int, float], None]], None]
    held_out: Callable[[], list[tuple[np.ndarray, str]]]
    split: str = "vad"  # how the bundle cuts long recordings (lalm-export --split): a speech detector hears no speech in key tones


def dtmf_task() -> AudioTask:
    from lalm_export.demo.dtmf import HELD_OUT_SEED, build_dtmf_lalm, dtmf_examples, train_dtmf

    return AudioTask(
        "dtmf",
        "keys",
        "batches of 16 fresh clips, 1 key -> 1-3 keys -> 3-6 keys",
        build_dtmf_lalm,
        lambda model, steps, on_step: train_dtmf(model, steps, on_step=on_step),
        lambda: dtmf_examples(64, seed=HELD_OUT_SEED),
        split="energy",
    )


def spoken_digits_task() -> AudioTask:
    from lalm_export.demo.spoken_digits import HELD_OUT_SEED, build_spoken_lalm, spoken_examples, train_spoken

    return AudioTask(
        "spoken",
        "digits",
        "batches of 16 from 6,000 espeak-ng clips, shifted, gained and noised; 1 digit -> 1-2 -> 1-4",
        build_spoken_lalm,
        lambda model, steps, on_step: train_spoken(model, steps, on_step=on_step, progress=True),
        lambda: spoken_examples(64, seed=HELD_OUT_SEED),
    )


def run_lalm(root: Path, task: AudioTask, steps: int, say) -> None:
    """Train a tiny LALM on `task`, export it with `lalm-export --lalm`, transcribe held-out
    clips with the torch-free runtime, and compare accuracy and speed with eager."""
    import json

    import soundfile
    from tqdm import tqdm

    from lalm_export import cli
    from lalm_export.demo.dtmf import edit_error_rate, key_accuracy
    from runtime import infer
    from runtime.api import load as load_bundle

    model = task.build(root / "checkpoints" / task.name)
    start = time.perf_counter()
    with tqdm(total=steps, unit="step", desc="   training", file=sys.stderr, leave=False, mininterval=1.0) as bar:
        task.train(model, steps, lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
    say(f"   trained {steps} steps ({task.recipe}) in {time.perf_counter() - start:.0f} s")
    saved, bundle = root / f"{task.name}-lalm", root / "bundles" / f"{task.name}-lalm"
    model.save_pretrained(saved)
    say(f"$ lalm-export --lalm {saved} --output {bundle} --split {task.split} -q")
    cli.main(["--lalm", str(saved), "--output", str(bundle), "--split", task.split, "-q"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    greedy, features = manifest["parity"]["greedy"], manifest["parity"]["outputs"]["audio_features"]
    say(f"   parity gate: audio features relative {features['relative']:.2e}; greedy tokens {greedy['agreement']:.0%} of {greedy['steps']} agree")
    held_out = task.held_out()
    files = [root / f"{task.unit}-{index}-{label}.wav" for index, (_, label) in enumerate(held_out[:2])]
    for path, (clip, _) in zip(files, held_out):
        soundfile.write(path, clip, 16_000)
    command = [str(bundle), "--audio", *map(str, files), "--max-new-tokens", "8", "--json", "-q"]
    say("$ python -m runtime.infer " + shlex.join(command))
    sys.stdout.flush()
    infer.main(command)
    sys.stdout.flush()
    runner = load_bundle(bundle)
    options = GenerationOptions(max_new_tokens=8)
    eager, onnx, eager_s, onnx_s = [], [], [], []
    for clip, _ in held_out[:2]:  # warm-up
        model.generate([clip], max_new_tokens=8)
        runner.transcribe([clip], options=options)
    for clip, _ in held_out:
        began = time.perf_counter()
        eager.append(model.generate([clip], max_new_tokens=8)[0])
        eager_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        onnx.append(runner.transcribe([clip], options=options)[0])
        onnx_s.append(time.perf_counter() - began)
    keys = [k for _, k in held_out]
    same = sum(e[1] == o.tokens for e, o in zip(eager, onnx))
    eager_ms, onnx_ms = statistics.median(eager_s) * 1e3, statistics.median(onnx_s) * 1e3
    say(
        table(
            ["pipeline", "held-out clips", f"{task.unit} right", "ms per clip (median)", "speedup", "tokens equal eager"],
            [
                ["eager PyTorch fp32", str(len(keys)), f"{key_accuracy(keys, [e[0] for e in eager]):.1%}", f"{eager_ms:.1f}", "1.00x", ""],
                [
                    "ONNX Runtime (runtime.api)",
                    str(len(keys)),
                    f"{key_accuracy(keys, [o.text for o in onnx]):.1%}",
                    f"{onnx_ms:.1f}",
                    f"{eager_ms / onnx_ms:.2f}x",
                    f"{same}/{len(keys)}",
                ],
            ],
        )
    )
    say(
        f"   {task.unit} right: the share in their place; edit distance (dropped, added or wrong) over the {task.unit}: "
        f"eager {edit_error_rate(keys, [e[0] for e in eager]):.1%}, ONNX Runtime {edit_error_rate(keys, [o.text for o in onnx]):.1%}"
    )


def run_runtime(root: Path) -> None:
    """Run `python -m runtime.infer` as a user would, on a speech-like file and on prompts."""
    import soundfile

    from runtime import infer

    soundfile.write(root / "speech.wav", speech_like(3.0, rate=44_100), 44_100)
    commands = [
        [str(root / "bundles" / "wav2vec2"), "--audio", str(root / "speech.wav"), "--output", str(root / "features.npz")],
        [str(root / "bundles" / "llm"), "--prompt", "the capital of france is", "--max-new-tokens", "12"],
        [str(root / "bundles" / "llm"), "--prompt", "one two", "--prompt", "hello, how are", "--max-new-tokens", "8", "--json", "-q"],
    ]
    for command in commands:
        print("$ python -m runtime.infer " + shlex.join(command), flush=True)
        sys.stderr.flush()
        infer.main(command)
        sys.stdout.flush()
        sys.stderr.flush()
