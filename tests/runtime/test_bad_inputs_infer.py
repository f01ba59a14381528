"""`python -m runtime.infer` and the runtime API given what a careless or hostile user gives:
each case ends with one line naming what is wrong and what to do, a non-zero exit, no
traceback and nothing written. In process, through `main(argv)`."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lalm_export.export.component import ExportOptions, export_bundle
from lalm_export.parity.signals import speech_like
from runtime.api import load
from runtime.errors import ContextLengthError, RuntimeUserError
from runtime.infer import main
from tests.helpers import assert_user_error, run_main


@pytest.fixture(scope="module")
def bundles(checkpoints, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    for family in ("hubert", "llm"):
        export_bundle(ExportOptions(family=family, model=str(checkpoints[family]), output=root / family), quiet=True)
    return root


def edit_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def replace_graph(bundle: Path, content: bytes) -> None:
    """Swap the graph file and update its sha256, as a user who 'fixed' the manifest would."""
    (bundle / "model.onnx").write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    edit_manifest(bundle, lambda m: m["graphs"]["model"].update(sha256=digest))


def decoder_graph_into(bundle: Path, decoder: Path) -> None:
    """The decoder's graph (and its weights file) under the encoder bundle's graph name."""
    for data in decoder.glob("model.onnx*data"):
        shutil.copy(data, bundle / data.name)
    replace_graph(bundle, (decoder / "model.onnx").read_bytes())


def no_graphs(m: dict) -> None:
    m["graphs"] = None


def no_model_graph(m: dict) -> None:
    m["graphs"] = {"other": m["graphs"]["model"]}


def graph_outside(m: dict) -> None:
    m["graphs"]["model"]["path"] = "../../other/model.onnx"


# case: (bundle, setup(bundle copy, llm bundle, tmp_path) -> None, extra argv, expected fragment)
CASES = {
    "bundle path is a file": ("hubert", None, ["BUNDLE_FILE", "--audio", "WAV", "--output", "OUT"], "is a file"),
    "manifest graphs null": ("hubert", lambda b, llm, t: edit_manifest(b, no_graphs), ["--audio", "WAV", "--output", "OUT"], "malformed"),
    "manifest without a model graph": ("hubert", lambda b, llm, t: edit_manifest(b, no_model_graph), ["--audio", "WAV", "--output", "OUT"], "no 'model' graph"),
    "graph path outside the bundle": ("hubert", lambda b, llm, t: edit_manifest(b, graph_outside), ["--audio", "WAV", "--output", "OUT"], "outside the bundle"),
    "graph that is not ONNX": (
        "hubert",
        lambda b, llm, t: replace_graph(b, b"not a graph at all"),
        ["--audio", "WAV", "--output", "OUT"],
        "not a graph ONNX Runtime can load",
    ),
    "decoder graph in an encoder bundle": (
        "hubert",
        lambda b, llm, t: decoder_graph_into(b, llm),
        ["--audio", "WAV", "--output", "OUT"],
        "the graph was replaced",
    ),
    "corrupt tokenizer.json": ("llm", lambda b, llm, t: (b / "tokenizer.json").write_text("{not json"), ["--prompt", "hi"], "not a tokenizer file"),
    "output is a folder": ("hubert", lambda b, llm, t: (t / "out.npz").mkdir(), ["--audio", "WAV", "--output", "OUT"], "is a folder"),
    "output under a file": ("hubert", None, ["--audio", "WAV", "--output", "FILE_OUT"], "is a file, not a folder"),
    "audio path is a folder": ("hubert", None, ["--audio", "TMP", "--output", "OUT"], "is a folder"),
    "clip shorter than the receptive field": ("hubert", None, ["--audio", "TINY_WAV", "--output", "OUT"], "receptive field of 105 samples"),
    "clip longer than the maximum": (
        "hubert",
        None,
        ["--audio", "LONG_WAV", "--output", "OUT", "--max-clip-memory-gb", "1000"],
        "split it into clips of at most 120 s",
    ),
    "temperature NaN": ("llm", None, ["--prompt", "hi", "--temperature", "nan"], "temperature"),
    "empty stop string": ("llm", None, ["--prompt", "hi", "--stop", ""], "--stop ''"),
    "prompt that is not UTF-8": ("llm", None, ["--prompt", "caf\udce9"], "not valid UTF-8"),
    "context exceeded": ("llm", None, ["--prompt", "hello", "--max-new-tokens", "300"], "more than the decoder's context of 256"),
    "threads past the cores": ("hubert", None, ["--threads", "100000", "--audio", "WAV", "--output", "OUT"], "this machine has"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, bundles, tmp_path, capsys):
    family, setup, argv, fragment = CASES[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles / family, bundle)
    wav, tiny_wav, long_wav = tmp_path / "a.wav", tmp_path / "tiny.wav", tmp_path / "long.wav"
    sf.write(wav, speech_like(1.0), 16_000)
    sf.write(tiny_wav, speech_like(0.001), 16_000)
    sf.write(long_wav, np.zeros(16_000 * 121, dtype=np.float32) + 0.01, 16_000)
    (tmp_path / "a-file").write_text("mine")
    if setup is not None:
        setup(bundle, bundles / "llm", tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    names = {
        "WAV": wav,
        "TINY_WAV": tiny_wav,
        "LONG_WAV": long_wav,
        "OUT": tmp_path / "out.npz",
        "TMP": tmp_path,
        "FILE_OUT": tmp_path / "a-file" / "out.npz",
        "BUNDLE_FILE": tmp_path / "a-file",
    }
    args = [names.get(a, a) for a in argv]
    if "BUNDLE_FILE" not in argv:
        args = [bundle, *args]
    result = run_main(main, *args, capsys=capsys)
    assert_user_error(result, fragment)
    assert result.returncode == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "something was written"


def test_api_errors_are_typed(bundles):
    generator = load(bundles / "llm")
    with pytest.raises(RuntimeUserError, match="no prompt given"):
        generator.complete([], generator_options())
    with pytest.raises(ContextLengthError) as caught:
        generator.complete(["hello"], generator_options(max_new_tokens=400))
    assert caught.value.context == 256 and caught.value.max_new_tokens == 400
    assert generator.complete(["hello"], generator_options(max_new_tokens=8))[0].tokens  # within the context: runs


def test_manifest_records_the_context_length(bundles):
    assert load(bundles / "llm").manifest.extra["context_length"] == 256


def generator_options(**kwargs):
    from runtime.generation import GenerationOptions

    return GenerationOptions(**kwargs)


def test_output_in_a_folder_without_write_permission(bundles, tmp_path, monkeypatch, capsys):
    # Tests run as root here, which writes anywhere: the refusal is driven through mkstemp.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    wav = tmp_path / "a.wav"
    sf.write(wav, speech_like(1.0), 16_000)
    result = run_main(main, bundles / "hubert", "--audio", wav, "--output", tmp_path / "out.npz", capsys=capsys)
    assert_user_error(result, "no permission to write")
    assert not (tmp_path / "out.npz").exists()


def test_a_negative_seed_is_one_line(bundles, capsys):
    result = run_main(main, bundles / "llm", "--prompt", "hi", "--temperature", "1", "--seed", "-1", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "seed must be a whole number from 0 to 2**63 - 1, not -1")


def test_a_file_whose_header_says_hours_is_refused_before_it_is_decoded(bundles, tmp_path, capsys, monkeypatch):
    """40 KB whose header says 1 Hz are 40,000 s: refused from the header (runtime.infer and
    runtime.batch, as the server does), never decoded and resampled to 640 million samples."""
    import runtime.audio
    from runtime.batch import main as batch_main

    path = tmp_path / "one-hertz.wav"
    sf.write(path, np.zeros(40_000, dtype=np.int16), 1, subtype="PCM_16")
    monkeypatch.setattr(runtime.audio, "_decode", lambda *a: pytest.fail("the file was decoded"))
    result = run_main(main, bundles / "hubert", "--audio", path, "--output", tmp_path / "f.npz", capsys=capsys)
    assert_user_error(result, "by its header (40000 frames at 1 Hz)")
    batch = run_main(batch_main, bundles / "hubert", "--input", path, "--output", tmp_path / "o.jsonl", "-q", capsys=capsys)
    assert batch.returncode == 1
    assert "by its header (40000 frames at 1 Hz)" in (tmp_path / "o.jsonl").read_text()
