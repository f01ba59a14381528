"""`python -m runtime.batch`: bulk results equal `runtime.infer`'s, a rerun resumes, and a
bad file is a record with its error while the others go on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from runtime.batch import main as batch_main
from runtime.infer import main as infer_main
from tests.helpers import assert_user_error, run_main


def read_records(path) -> dict[str, dict]:
    return {record["file"]: record for record in map(json.loads, path.read_text().splitlines())}


def test_transcripts_equal_runtime_infer_and_a_rerun_resumes(serve_bundles, audio_files, tmp_path, capsys):
    output = tmp_path / "t.jsonl"
    first = run_main(batch_main, serve_bundles["lalm"], "--input", *audio_files[:2], "--output", output, "--max-new-tokens", 10, "-q", capsys=capsys)
    assert first.returncode == 0, first.stderr
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(str(p) for p in audio_files) + "\n")
    second = run_main(batch_main, serve_bundles["lalm"], "--input", listing, "--output", output, "--max-new-tokens", 10, capsys=capsys)
    assert second.returncode == 0 and "4 file(s), 2 already in" in second.stderr and "2 to do" in second.stderr
    records = read_records(output)
    assert len(output.read_text().splitlines()) == 4  # nothing done twice
    infer = run_main(infer_main, serve_bundles["lalm"], "--audio", *audio_files, "--max-new-tokens", 10, "--json", "-q", capsys=capsys)
    for expected in map(json.loads, infer.stdout.splitlines()):
        record = records[str(expected["file"])]
        assert (record["text"], record["tokens"]) == (expected["text"], expected["tokens"])


def test_features_are_npy_files_equal_to_runtime_infer(serve_bundles, audio_files, tmp_path, capsys):
    output = tmp_path / "f.jsonl"
    result = run_main(batch_main, serve_bundles["wav2vec2"], "--input", audio_files[0].parent, "--output", output, "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    records = read_records(output)
    run_main(infer_main, serve_bundles["wav2vec2"], "--audio", *audio_files, "--output", tmp_path / "f.npz", "-q", capsys=capsys)
    expected = np.load(tmp_path / "f.npz")
    for path in audio_files:
        record = records[str(path)]
        assert record["features"].startswith(str(tmp_path / "f.features"))
        assert np.array_equal(np.load(record["features"]), expected[path.name]) and record["shape"] == list(expected[path.name].shape)


def test_a_bad_file_is_recorded_with_its_error_and_retried_on_the_next_run(serve_bundles, audio_files, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    output = tmp_path / "t.jsonl"
    output.write_text('{"file": "/elsewhere/x.wav", "text": "kept"}\n{"file": "/elsewhere/y.w')  # a run killed mid-line
    result = run_main(batch_main, serve_bundles["lalm"], "--input", audio_files[0], bad, "--output", output, "--max-new-tokens", 4, "-q", capsys=capsys)
    assert result.returncode == 1 and "1 done, 1 failed" in result.stderr and "Traceback" not in result.stderr
    records = read_records(output)
    assert records["/elsewhere/x.wav"]["text"] == "kept" and "/elsewhere/y.w" not in records
    assert "is not a readable audio file" in records[str(bad)]["error"] and records[str(audio_files[0])]["text"]
    again = run_main(batch_main, serve_bundles["lalm"], "--input", audio_files[0], bad, "--output", output, "-q", capsys=capsys)
    assert again.returncode == 1 and "0 done, 1 failed" in again.stderr


@pytest.mark.parametrize(
    ("bundle", "args", "fragment"),
    [
        ("lalm", ["--input", "missing.wav"], "--input missing.wav does not exist"),
        ("llm", ["--input", "AUDIO"], "runtime.batch takes audio"),
        ("lalm", ["--input", "AUDIO", "--batch-size", "0"], "--batch-size must be at least 1"),
        ("lalm", ["--input", "EMPTY"], "no audio files"),
        ("lalm", ["--input", "LATIN1_LIST"], "is not a UTF-8 text list"),
        ("wav2vec2", ["--input", "AUDIO", "--features-dir", "A_FILE"], "--features-dir"),
    ],
)
def test_bad_batch_inputs_are_one_line_errors(bundle, args, fragment, serve_bundles, audio_files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.txt").write_bytes("caf\xe9.wav\n".encode("latin-1"))
    (tmp_path / "a-file").write_text("mine")
    names = {"AUDIO": str(audio_files[0]), "EMPTY": str(tmp_path / "empty"), "LATIN1_LIST": str(tmp_path / "list.txt"), "A_FILE": str(tmp_path / "a-file")}
    args = [names.get(a, a) for a in args]
    result = run_main(batch_main, serve_bundles[bundle], *args, "--output", tmp_path / "new" / "folders" / "o.jsonl", capsys=capsys)
    assert_user_error(result, fragment)
    assert not (tmp_path / "new").exists()  # a refused run writes nothing, not even the folders of its output


def write_wav(path):
    sf.write(path, np.zeros(1600, dtype=np.float32), 16_000, format="WAV")  # a recording given as --output by mistake


FOREIGN_OUTPUTS = {
    "a text file": lambda p: p.write_text("my notes\nthe last line, no newline"),
    "audio": write_wav,
    "another program's JSON Lines": lambda p: p.write_text('{"id": 1}\n{"id": 2}\n'),
    "a link to a text file": lambda p: (p.with_name("notes.txt").write_text("my notes\nlast"), p.symlink_to(p.with_name("notes.txt"))),
}


@pytest.mark.parametrize("case", sorted(FOREIGN_OUTPUTS))
def test_an_output_that_is_not_its_results_file_is_refused_untouched(case, serve_bundles, audio_files, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    FOREIGN_OUTPUTS[case](output)
    before = output.read_bytes()
    result = run_main(batch_main, serve_bundles["lalm"], "--input", audio_files[0], "--output", output, capsys=capsys)
    assert_user_error(result, "is not a results file of runtime.batch")
    assert output.read_bytes() == before


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(serve_bundles, audio_files, tmp_path, capsys):
    from runtime.batch import output_lock

    output = tmp_path / "out.jsonl"
    with output_lock(output):  # a first run, holding the output
        result = run_main(batch_main, serve_bundles["lalm"], "--input", audio_files[0], "--output", output, capsys=capsys)
    assert_user_error(result, "another runtime.batch is writing")
    assert not output.exists()
    after = run_main(batch_main, serve_bundles["lalm"], "--input", audio_files[0], "--output", output, "-q", "--max-new-tokens", "4", capsys=capsys)
    assert after.returncode == 0 and len(output.read_text().splitlines()) == 1
