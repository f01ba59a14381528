"""`python -m runtime.batch BUNDLE --input FILES_OR_LISTS --output results.jsonl [--ray]`:
offline bulk transcription (audio LLM bundles) or feature extraction (encoder bundles).

One JSON object per file, appended as each is done: a run that stops is resumed by running
it again (files already in the output are skipped; failed ones are tried again). With `--ray`,
Ray Data's `map_batches` spreads the files over actors that each hold one session."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.flags import add_session_flags

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
LIST_SUFFIXES = (".txt", ".lst")

EPILOG = """examples:
  python -m runtime.batch bundles/lalm --input recordings/ --output transcripts.jsonl
  python -m runtime.batch bundles/wav2vec2 --input files.txt --output feats.jsonl      # .npy files in feats.features/
  python -m runtime.batch bundles/lalm --input recordings/ --output t.jsonl --ray --actors 4

inputs: audio files (wav, flac, ogg; mp3 where libsndfile reads it), folders (searched recursively)
and .txt/.lst lists of paths (one per line, relative to the list's folder).

exit status: 0 every file done; 1 user error, or some files failed (their records hold "error"); 2 bad flags."""


@dataclass(frozen=True)
class BatchSettings:
    prompt: str | None = None
    max_new_tokens: int = 128
    features_dir: str | None = None
    split: str | None = None  # how recordings longer than the window are cut (None: the bundle's)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.batch",
        description="Transcribe (audio LLM bundles) or extract features (encoder bundles) for many audio files, resumably, locally or on Ray Data.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=Path, help="bundle folder written by lalm-export (audio LLM or encoder)")
    parser.add_argument("--input", nargs="+", type=Path, required=True, metavar="PATH", help="audio files, folders, or .txt/.lst lists of paths")
    parser.add_argument("--output", type=Path, required=True, help="JSON Lines file; an existing one is resumed")
    parser.add_argument("--features-dir", type=Path, help="encoder bundles: where the .npy files go (default: OUTPUT without .jsonl, plus .features)")
    parser.add_argument("--prompt", help="audio LLM bundles: the instruction (default: the bundle's prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="audio LLM bundles: tokens per file at most (default: 128)")
    parser.add_argument(
        "--split",
        choices=("vad", "energy", "fixed"),
        help="audio LLM bundles: where a file longer than the window is cut (vad: at pauses in speech; energy: at quiet stretches; "
        "fixed: overlapping windows); its record holds the segments (default: the bundle's, else vad)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="files per batch (the encoder batches equal-shape clips) (default: 8)")
    add_session_flags(parser, "a longer file gets an error record with the length that fits")
    ray = parser.add_argument_group("Ray Data")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data: map_batches over actors, one session each")
    ray.add_argument("--actors", type=int, default=1, help="actors (sessions) to run at once (default: 1)")
    ray.add_argument("--actor-gpus", type=float, default=0.0, help="GPUs per actor (default: 0; e.g. 1 with --provider cuda)")
    ray.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


# --- inputs and resuming ------------------------------------------------------------------


def collect_inputs(paths: Sequence[Path]) -> list[str]:
    """Every audio file named by `paths` (files, folders, lists), as absolute paths, each once, in order."""
    from runtime.errors import RuntimeUserError
    from runtime.manifest import denied, path_state

    found: dict[str, None] = {}
    for path in paths:
        state = path_state(path)
        if state == "denied" or (state == "folder" and not os.access(path, os.R_OK | os.X_OK)):
            raise RuntimeUserError(denied("--input", path))
        if state == "folder":
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        elif path.suffix.lower() in LIST_SUFFIXES and state == "file":
            try:
                lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            except UnicodeDecodeError:
                raise RuntimeUserError(f"--input {path} is not a UTF-8 text list of audio paths; write it in UTF-8, one path a line") from None
            except OSError as err:
                raise RuntimeUserError(f"--input {path} cannot be read ({err.strerror}); make it readable") from None
            files = [(path.parent / line) for line in lines if line and not line.startswith("#")]
        elif state == "file":
            files = [path]
        else:
            raise RuntimeUserError(f"--input {path} does not exist")
        for file in files:
            found.setdefault(str(file.resolve()), None)
    if not found:
        raise RuntimeUserError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return list(found)


def done_files(output: Path) -> set[str]:
    """Files with a result in `output`. The whole file is read as runtime.batch's results
    first: anything else (a text file, audio, another program's JSON Lines) is refused before a
    byte of it changes. Then a last line cut short (a run killed mid-write) is removed, so that
    appending goes on from a whole line."""
    from runtime.errors import RuntimeUserError

    if not output.exists():
        if output.is_symlink():
            raise RuntimeUserError(f"--output {output} is a link to a file that does not exist; pass a .jsonl file path")
        return set()
    if output.is_dir():
        raise RuntimeUserError(f"--output {output} is a folder; pass a .jsonl file path")
    foreign = f"{output} is not a results file of runtime.batch"
    try:
        data = output.read_bytes()
        text = data.decode("utf-8")
    except OSError as err:
        raise RuntimeUserError(f"--output {output} cannot be read ({err.strerror}); pass a file you can read and write") from None
    except UnicodeDecodeError:
        raise RuntimeUserError(f"{foreign} (not UTF-8 text); nothing in it was changed: pass another --output") from None
    good_end = data.rfind(b"\n") + 1
    done = set()
    for number, line in enumerate(text[:good_end].splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("file"), str):
            raise RuntimeUserError(f"{foreign} (line {number} is not one of its records); nothing in it was changed: pass another --output")
        if "error" not in record:
            done.add(record["file"])
    if good_end < len(data):
        if not data[good_end:].startswith(b'{"file": '):
            raise RuntimeUserError(f"{foreign} (its last line is not one of its records); nothing in it was changed: pass another --output")
        with open(output, "r+b") as handle:
            handle.truncate(good_end)
    return done


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """One runtime.batch run per output file at a time: a second one would append every
    record again. A lock file beside the output, removed by the run that made it."""
    import fcntl

    from runtime.errors import RuntimeUserError

    lock = output.with_name(f".{output.name}.lock")
    made = [folder for folder in output.parents if not folder.exists()]  # innermost first
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+", encoding="utf-8")
    except OSError as err:
        raise RuntimeUserError(f"--output {output}: cannot write in {output.parent} ({err.strerror}); pass a path in a folder you can write to") from None
    try:
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeUserError(f"another runtime.batch is writing {output}; wait for it to end, or pass another --output") from None
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)
    finally:
        if not output.exists():  # a run that wrote nothing leaves no folder made for it
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break


# --- the work -------------------------------------------------------------------------------


def features_path(features_dir: Path, file: str) -> Path:
    """One .npy per input, named by its stem and a hash of its full path (two `a.wav` in different folders differ)."""
    digest = hashlib.sha256(file.encode("utf-8")).hexdigest()[:10]
    return features_dir / f"{Path(file).stem}-{digest}.npy"


def records_for(model: Any, files: Sequence[str], settings: BatchSettings) -> list[dict[str, Any]]:
    """One record per file: `runtime.infer --json`'s fields for an audio LLM, the .npy path and
    shape for an encoder; a file that fails gets `{"file", "error"}` and the others go on."""
    from runtime.audio import load_audio
    from runtime.errors import RuntimeUserError

    clips, long_files, records = {}, [], {}
    for file in files:
        try:
            if model.role == "lalm" and model.long_recording(file, 0) is not None:
                long_files.append(file)  # read in blocks and run alone: its pieces are its batch
            else:
                clips[file] = load_audio(file, model.limits)
        except RuntimeUserError as err:
            records[file] = {"file": file, "error": str(err)}
    for file in long_files:
        try:
            records[file] = {"file": file, **_run(model, [(file, file)], settings)[0]}
        except RuntimeUserError as err:
            records[file] = {"file": file, "error": str(err)}
    if clips:
        try:
            results = _run(model, list(clips.items()), settings)
        except RuntimeUserError:  # one bad clip fails its batch: run them one by one to find it
            results = []
            for item in clips.items():
                try:
                    results.extend(_run(model, [item], settings))
                except RuntimeUserError as err:
                    results.append({"error": str(err)})
        for file, result in zip(clips, results):
            records[file] = {"file": file, **result}
    return [records[file] for file in files]


def _run(model: Any, items: list[tuple[str, Any]], settings: BatchSettings) -> list[dict[str, Any]]:
    """Results of (file, audio) pairs run as one batch; `elapsed_s` is the batch's wall time,
    `batch_files` its files."""
    import time

    import numpy as np

    from runtime.generation import GenerationOptions

    if model.role == "encoder":
        folder = Path(settings.features_dir)
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for (file, _), encoded in zip(items, model.encode([clip for _, clip in items])):
            path = features_path(folder, file)
            tmp = path.with_suffix(".partial.npy")
            np.save(tmp, encoded.hidden_states, allow_pickle=False)
            os.replace(tmp, path)
            out.append({"features": str(path), "shape": list(encoded.hidden_states.shape), "audio_s": round(encoded.seconds, 3)})
        return out
    start = time.perf_counter()
    options = GenerationOptions(max_new_tokens=settings.max_new_tokens)
    results = model.transcribe([clip for _, clip in items], settings.prompt, options, split=settings.split)
    elapsed = round(time.perf_counter() - start, 6)
    return [
        {
            "text": r.text,
            "tokens": r.tokens,
            "time_to_first_token_s": r.time_to_first_token_s,
            "tokens_per_s": r.tokens_per_s,
            "audio_s": r.audio_s,
            **r.timings,
            "elapsed_s": elapsed,
            "batch_files": len(items),
            "segments": [asdict(segment) for segment in r.segments],
        }
        for r in results
    ]


class BundleWorker:
    """A Ray Data actor: one session over the bundle, a batch of file paths in, JSON records out."""

    def __init__(self, bundle: str, settings: dict[str, Any], session: dict[str, Any]) -> None:
        from runtime.runners import load
        from runtime.sessions import SessionOptions

        self.model = load(bundle, SessionOptions(**session))
        self.settings = BatchSettings(**settings)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        records = records_for(self.model, [str(f) for f in batch["file"]], self.settings)
        return {"record": [json.dumps(r) for r in records]}


def session_options(args: argparse.Namespace) -> Any:
    from runtime.sessions import SessionOptions

    return SessionOptions(provider=args.provider, threads=args.threads, max_clip_memory_gb=args.max_clip_memory_gb)


def run_local(args: argparse.Namespace, todo: list[str], settings: BatchSettings) -> Iterator[list[dict[str, Any]]]:
    from runtime.runners import load

    model = load(args.bundle, session_options(args))
    check_bundle_kind(model.role, settings.split)
    for start in range(0, len(todo), args.batch_size):
        yield records_for(model, todo[start : start + args.batch_size], settings)


def run_ray(args: argparse.Namespace, todo: list[str], settings: BatchSettings) -> Iterator[list[dict[str, Any]]]:
    import ray

    from runtime.manifest import read_manifest

    check_bundle_kind(read_manifest(args.bundle).role, settings.split)
    # "local": a new instance, never one a previous run is still tearing down
    ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts files
    dataset = ray.data.from_items([{"file": f} for f in todo]).map_batches(
        BundleWorker,
        fn_constructor_kwargs={"bundle": str(args.bundle.resolve()), "settings": asdict(settings), "session": asdict(session_options(args))},
        batch_size=args.batch_size,
        concurrency=args.actors,
        num_cpus=1,
        num_gpus=args.actor_gpus,
    )
    for row in dataset.iter_rows():
        yield [json.loads(row["record"])]


def check_bundle_kind(role: str, split: str | None = None) -> None:
    from runtime.errors import RuntimeUserError

    if role not in ("encoder", "lalm"):
        raise RuntimeUserError(
            "runtime.batch takes audio: pass an audio LLM or encoder bundle (a text bundle takes prompts: use runtime.infer or runtime.serve)"
        )
    if split is not None and role != "lalm":
        raise RuntimeUserError("--split cuts long recordings for an audio LLM bundle; an encoder bundle refuses files longer than it encodes")


def append_records(output: Path, batches: Iterable[list[dict[str, Any]]], total: int, quiet: bool) -> tuple[int, int]:
    """Append each record as a line as soon as it exists; (done, failed). The file is opened
    at the first record, so a run refused before any result leaves no empty output behind."""
    from tqdm import tqdm

    done = failed = 0
    handle = None
    try:
        with tqdm(total=total, unit="file", disable=quiet, file=sys.stderr) as progress:
            for records in batches:
                handle = handle or open(output, "a", encoding="utf-8")
                for record in records:
                    handle.write(json.dumps(record) + "\n")
                    failed += "error" in record
                    done += "error" not in record
                handle.flush()
                progress.update(len(records))
    finally:
        if handle is not None:
            handle.close()
    return done, failed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.errors import RuntimeUserError

    try:
        for name in ("batch_size", "max_new_tokens", "actors"):
            if getattr(args, name) < 1:
                raise RuntimeUserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
        files = collect_inputs(args.input)
        with output_lock(args.output):
            return run_batch(args, files)
    except RuntimeUserError as err:
        print(f"runtime.batch: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the disk, not the input: full, read-only, gone
        print(f"runtime.batch: error: {err.filename or args.output}: {err.strerror or err}; the records written so far are kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"runtime.batch: interrupted; run the same command again to go on from {args.output}", file=sys.stderr)
        return 130


def make_features_dir(folder: Path) -> None:
    """An encoder bundle's .npy folder, made and known writable before any file is run (not a
    failed record per file)."""
    from runtime.errors import RuntimeUserError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeUserError(f"--features-dir {folder}: cannot make it ({err.strerror}); pass a folder you can write to") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RuntimeUserError(f"--features-dir {folder}: no permission to write in it; pass a folder you can write to")


def run_batch(args: argparse.Namespace, files: list[str]) -> int:
    """Resume from the output, run what is left, append its records; the exit status."""
    from runtime.errors import RuntimeUserError
    from runtime.manifest import path_state, read_manifest

    finished = done_files(args.output)
    todo = [f for f in files if f not in finished]
    features_dir = args.features_dir or args.output.with_name(args.output.name.removesuffix(".jsonl") + ".features")
    if path_state(features_dir) == "file":
        raise RuntimeUserError(f"--features-dir {features_dir} is a file; pass a folder for the .npy files (made if missing)")
    if read_manifest(args.bundle).role == "encoder":
        make_features_dir(features_dir)
    settings = BatchSettings(prompt=args.prompt, max_new_tokens=args.max_new_tokens, features_dir=str(features_dir.resolve()), split=args.split)
    if not args.quiet:
        print(f"runtime.batch: {len(files)} file(s), {len(files) - len(todo)} already in {args.output}, {len(todo)} to do", file=sys.stderr)
    if not todo:
        return 0
    if args.ray:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise RuntimeUserError("--ray needs Ray; install it with: pip install 'lalm-export[ray]'")
    batches = run_ray(args, todo, settings) if args.ray else run_local(args, todo, settings)
    done, failed = append_records(args.output, batches, len(todo), args.quiet)
    if not args.quiet or failed:
        print(f'runtime.batch: {done} done, {failed} failed (their records hold "error"; a rerun tries them again) -> {args.output}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
