"""`python -m runtime.infer BUNDLE ...`: encoder features from audio files, or text from prompts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from runtime.flags import add_session_flags
from runtime.interruptible import exit_process, run_interruptibly

EPILOG = """examples:
  # hidden states of two recordings (any rate, mono or stereo) into one .npz
  python -m runtime.infer bundles/wav2vec2 --audio a.wav b.flac --output feats.npz

  # stream a completion; or one JSON object per prompt with tokens and timings
  python -m runtime.infer bundles/llm --prompt "The capital of France is" --max-new-tokens 32
  python -m runtime.infer bundles/llm --prompt "Hello" --prompt "One two" --json --temperature 0.8 --top-p 0.9 --seed 1

  # an audio LLM bundle (lalm-export --lalm): each file's audio in the prompt, text out
  python -m runtime.infer bundles/lalm --audio a.wav b.wav --json   # the bundle's own prompt, named on stderr

  # a recording longer than the bundle's window: cut at its pauses, each piece's start, end and text in --json
  python -m runtime.infer bundles/lalm --audio meeting.flac --json --split vad

exit status: 0 done; 1 user error (one line on stderr); 2 bad flags; 130 interrupted (Ctrl-C stops even a long model call at once)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.infer",
        description="Run an lalm-export bundle with ONNX Runtime (no PyTorch): audio in, features out (encoders); prompts in, text out "
        "(decoders); audio (and a prompt) in, text out (audio LLMs).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=Path, help="bundle folder written by lalm-export")
    audio = parser.add_argument_group("encoder bundles")
    audio.add_argument("--audio", nargs="+", type=Path, metavar="FILE", help="wav/flac/ogg files (downmixed, resampled to 16 kHz)")
    audio.add_argument("--output", type=Path, help="the .npz to write: one (frames, hidden) array per file, under the file's name")
    audio.add_argument("--force", action="store_true", help="replace an existing --output")
    text = parser.add_argument_group("decoder bundles")
    text.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a prompt; repeat for a batch (left-padded). Audio LLM bundles: one prompt for every --audio file, the audio placed "
        "first unless the prompt holds the placeholder, in a user turn of the checkpoint's chat template where the bundle has one (default: the bundle's prompt, the one it was trained with: manifest extra.prompt, "
        "shown on the first line)",
    )
    text.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default: 32)")
    text.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default), else sampling temperature")
    text.add_argument("--top-k", type=int, default=0, help="sample from the k best tokens (0: off)")
    text.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    text.add_argument("--seed", type=int, help="seed for reproducible sampling")
    text.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop a completion at this text; repeatable")
    text.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    text.add_argument("--json", action="store_true", help="print one JSON object per prompt: text, tokens, timings")
    long = parser.add_argument_group("audio LLM bundles: recordings longer than the window")
    long.add_argument(
        "--split",
        choices=("vad", "energy", "fixed"),
        help="where a recording longer than the bundle's window is cut: vad (Silero VAD: at pauses in speech, silence skipped), "
        "energy (at quiet stretches: tones, music), fixed (windows overlapping by 1 s) (default: the bundle's, manifest extra.split, else vad)",
    )
    run = parser.add_argument_group("session")
    add_session_flags(run)
    run.add_argument(
        "--save-optimized",
        action="store_true",
        help="write the optimized graph beside the bundle's graph (model.optimized.onnx) so later starts can skip optimization",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    return parser


def say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def write_npz(path: Path, arrays: dict, force: bool) -> None:
    """Write atomically: a failed run never leaves a half-written file in place."""
    import numpy as np

    from runtime.errors import RuntimeUserError

    if path.is_dir():
        raise RuntimeUserError(f"--output {path} is a folder; pass a file path such as {path / 'features.npz'}")
    if path.exists() and not force:
        raise RuntimeUserError(f"--output {path} exists; pass --force to replace it")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RuntimeUserError(f"--output {path}: {blocking} is a file, not a folder; pass a path in a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    except PermissionError:
        raise RuntimeUserError(f"--output {path}: no permission to write in {path.parent}; pass a path in a folder you can write to") from None
    os.close(handle)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_encoder(runner, args: argparse.Namespace) -> None:
    from runtime.errors import RuntimeUserError

    if args.prompt:
        raise RuntimeUserError("this is an encoder bundle: it takes --audio, not --prompt")
    if not args.audio or args.output is None:
        raise RuntimeUserError("an encoder bundle needs --audio FILE [FILE ...] and --output OUT.npz")
    names = [p.name for p in args.audio]
    if len(set(names)) != len(names):
        raise RuntimeUserError("two --audio files share a file name; the .npz stores each under its name, so rename one")
    results = run_interruptibly(lambda: runner.encode_files(args.audio))
    arrays = {}
    for result in results:
        arrays[result.name] = result.hidden_states
        if result.all_layers is not None:
            arrays[f"{result.name}:all_layers"] = result.all_layers
        frames, hidden = result.hidden_states.shape
        say(f"{result.name}: {result.seconds:.2f} s audio, {frames} frames x {hidden}, {result.elapsed_s * 1e3:.1f} ms", args.quiet)
    write_npz(args.output, arrays, args.force)
    say(f"wrote {args.output} ({len(results)} file(s), provider {runner.provider})", args.quiet)


def run_decoder(generator, args: argparse.Namespace) -> None:
    from runtime.errors import RuntimeUserError
    from runtime.generation import GenerationOptions

    if args.audio:
        raise RuntimeUserError("this is a decoder bundle: it takes --prompt, not --audio")
    if not args.prompt:
        raise RuntimeUserError("a decoder bundle needs --prompt TEXT")
    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        stop_at_eos=not args.ignore_eos,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    stream = not args.json and len(args.prompt) == 1
    on_text = (lambda text: print(text, end="", flush=True)) if stream else None
    completions = run_interruptibly(lambda: generator.complete(args.prompt, options, stop_strings=args.stop, on_text=on_text))
    for completion in completions:
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": completion.prompt,
                        "text": completion.text,
                        "tokens": completion.tokens,
                        "time_to_first_token_s": completion.time_to_first_token_s,
                        "tokens_per_s": completion.tokens_per_s,
                        **completion.timings,
                    }
                )
            )
        elif not stream:
            print(f"{completion.prompt}{completion.text}")
    if stream:
        print()
    first = completions[0]
    say(
        f"[{len(first.tokens)} tokens, first after {first.time_to_first_token_s * 1e3:.1f} ms, {first.tokens_per_s:.1f} tokens/s, provider {generator.provider}]",
        args.quiet,
    )


@contextmanager
def piece_progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr per long recording: its pieces transcribed out of all."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def on_piece(name: str, done: int, total: int) -> None:
        if quiet:
            return
        if name not in bars:
            bars[name] = tqdm(total=total, desc=name, unit="piece", file=sys.stderr, leave=True)
        bars[name].update(done - bars[name].n)

    try:
        yield on_piece
    finally:
        for bar in bars.values():
            bar.close()


def run_lalm(runner, args: argparse.Namespace) -> None:
    """Audio files in, text out: each file's audio in the prompt, the first file's text streamed."""
    from runtime.errors import RuntimeUserError
    from runtime.generation import GenerationOptions

    if not args.audio:
        raise RuntimeUserError("an audio LLM bundle needs --audio FILE [FILE ...] (and takes one --prompt)")
    if args.output is not None:
        raise RuntimeUserError("an audio LLM bundle prints text; --output is for an encoder bundle's features (use --json for records)")
    if args.prompt and len(args.prompt) > 1:
        raise RuntimeUserError("an audio LLM bundle takes one --prompt, applied to every --audio file")
    prompt = args.prompt[0] if args.prompt else None
    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens, stop_at_eos=not args.ignore_eos, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    # One file streams its text bare as it comes; several print one line each, "name: text"
    streaming = not args.json and len(args.audio) == 1
    on_text = (lambda text: print(text, end="", flush=True)) if streaming else None
    with piece_progress(args.quiet) as on_piece:
        results = run_interruptibly(
            lambda: runner.transcribe(args.audio, prompt, options, on_text=on_text, stop_strings=args.stop, split=args.split, on_piece=on_piece)
        )
    for index, result in enumerate(results):
        if args.json:
            record = {
                "file": str(args.audio[index]),
                "text": result.text,
                "tokens": result.tokens,
                "time_to_first_token_s": result.time_to_first_token_s,
                "tokens_per_s": result.tokens_per_s,
                "audio_s": result.audio_s,
                **result.timings,
                "batch_size": result.batch_size,
                "segments": [asdict(segment) for segment in result.segments],
            }
            print(json.dumps(record))
        elif streaming:
            print()
        else:
            print(f"{result.name}: {result.text}")
    say(f"[{len(results)} file(s), {len(results[0].tokens)} tokens for the first, provider {runner.provider}]", args.quiet)


RUNS = {"encoder": run_encoder, "decoder": run_decoder, "lalm": run_lalm}  # each kind of bundle's request from the flags


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.errors import RuntimeUserError
    from runtime.runners import load
    from runtime.sessions import SessionOptions

    try:
        model = run_interruptibly(
            lambda: load(
                args.bundle,
                SessionOptions(provider=args.provider, threads=args.threads, save_optimized=args.save_optimized, max_clip_memory_gb=args.max_clip_memory_gb),
            )
        )
        trained = "".join(f", {name} {value!r}" for name, value in model.card_facts().items())
        say(f"{args.bundle}: {model.manifest.family} {model.manifest.role} ({model.manifest.precision}){trained}, provider {model.provider}", args.quiet)
        if any(not stop for stop in args.stop):
            raise RuntimeUserError("--stop '' would stop every completion at once; pass the text to stop at")
        if args.split is not None and model.role != "lalm":
            raise RuntimeUserError(f"--split cuts long recordings for an audio LLM bundle; this is a {model.role} bundle")
        RUNS[model.role](model, args)
    except RuntimeUserError as err:
        print(f"runtime.infer: error: {err}", file=sys.stderr)
        return 1
    except PermissionError as err:
        from runtime.manifest import denied

        print(f"runtime.infer: error: {denied('path', err.filename)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("runtime.infer: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    exit_process(main())
