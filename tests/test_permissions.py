"""Paths this user may not read or write, and a disk that refuses to write, through every
command: one line naming the path and what to do, exit 1, no traceback, nothing written. The
suite runs as root, so the denial is played by `tests.helpers.deny`."""

from __future__ import annotations

import builtins
from pathlib import Path

from lalm_export.cli import main as export_main
from runtime.batch import main as batch_main
from runtime.infer import main as infer_main
from runtime.serve import main as serve_main
from tests.helpers import assert_user_error, deny, run_main


def test_lalm_export_names_a_model_folder_or_output_it_may_not_reach(checkpoints, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    deny(monkeypatch, locked)
    for args, fragment in (
        (["--encoder", "hubert", "--model", locked / "hubert"], f"model path {locked / 'hubert'}: permission denied"),
        (["--encoder", "hubert", "--model", "locked/hubert"], "model path locked/hubert: permission denied"),  # a path, not a hub id
        (["--encoder", "hubert", "--model", checkpoints["hubert"], "--output", locked / "bundle"], f"--output {locked / 'bundle'}: permission denied"),
        (["--lalm", locked / "lalm"], f"--lalm {locked / 'lalm'}: permission denied"),
    ):
        monkeypatch.chdir(tmp_path)
        outcome = run_main(export_main, "--output", tmp_path / "bundle", *args, capsys=capsys)
        assert outcome.returncode == 1
        assert_user_error(outcome, fragment)
    assert not (tmp_path / "bundle").exists()


def test_lalm_export_turns_any_permission_error_into_one_line(tmp_path, monkeypatch, capsys):
    """Wherever the export meets a file it may not read (here the LALM folder), not a traceback."""
    import lalm_export.export.lalm as export_lalm

    def unreadable(opts, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(opts.lalm) / "lalm_config.json"))

    monkeypatch.setattr(export_lalm, "load_merged_lalm", unreadable)
    (tmp_path / "lalm").mkdir()
    outcome = run_main(export_main, "--lalm", tmp_path / "lalm", "--output", tmp_path / "bundle", capsys=capsys)
    assert outcome.returncode == 1
    assert_user_error(outcome, f"path {tmp_path / 'lalm' / 'lalm_config.json'}: permission denied")
    assert "no bundle was written" in outcome.stderr and not (tmp_path / "bundle").exists()


def test_the_runtime_names_a_bundle_or_audio_it_may_not_read(serve_bundles, audio_files, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    deny(monkeypatch, locked)
    cases = [
        (infer_main, [locked / "bundle", "--audio", audio_files[0]], f"bundle {locked / 'bundle'}: permission denied"),
        (infer_main, [serve_bundles["lalm"], "--audio", locked / "a.wav"], f"audio file {locked / 'a.wav'}: permission denied"),
        (serve_main, [locked / "bundle"], f"bundle {locked / 'bundle'}: permission denied"),
        (batch_main, [locked / "bundle", "--input", audio_files[0], "--output", tmp_path / "o.jsonl"], f"bundle {locked / 'bundle'}: permission denied"),
        (batch_main, [serve_bundles["lalm"], "--input", locked, "--output", tmp_path / "o.jsonl"], f"--input {locked}: permission denied"),
        (
            batch_main,
            [serve_bundles["wav2vec2"], "--input", audio_files[0], "--output", tmp_path / "o.jsonl", "--features-dir", locked / "f"],
            f"--features-dir {locked / 'f'}",
        ),
    ]
    for main, args, fragment in cases:
        outcome = run_main(main, *args, capsys=capsys)
        assert outcome.returncode == 1
        assert_user_error(outcome, fragment)
    assert not (tmp_path / "o.jsonl").exists()


def test_runtime_batch_on_a_full_disk_is_one_line_and_keeps_the_records_written(serve_bundles, audio_files, tmp_path, monkeypatch, capsys):
    import runtime.batch

    output = tmp_path / "o.jsonl"

    def full_disk(path, mode="r", *args, **kwargs):
        if Path(path) == output and "a" in mode:
            raise OSError(28, "No space left on device", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runtime.batch, "open", full_disk, raising=False)
    outcome = run_main(batch_main, serve_bundles["lalm"], "--input", audio_files[0], "--output", output, "-q", capsys=capsys)
    assert outcome.returncode == 1
    assert_user_error(outcome, f"{output}: No space left on device")
