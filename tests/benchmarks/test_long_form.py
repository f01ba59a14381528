"""`python -m benchmarks long-form` end to end on the tiny test audio LLM (a one-minute recording,
past its 48 s window): the rows, the server's memory after each request, the report; and its
refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks.__main__ import main as bench_main
from tests.helpers import assert_user_error, run_main


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng; .ci/run installs it)")
def test_long_form_measures_a_short_clip_and_a_long_recording(serve_bundles, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["long-form", "--bundle", serve_bundles["lalm"], "--minutes", 1, "--short-seconds", 5, "--tokens", 2, "--server", "--out", out]
    result = run_main(bench_main, *argv, "--work", tmp_path / "work", capsys=capsys)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    short, long = results["rows"]
    assert (short["seconds"], short["pieces"]) == (5.0, 1) and long["seconds"] == 60.0 and long["pieces"] > 1
    assert all(row["peak_rss_gb"] > 0 and row["real_time_factor"] > 0 for row in results["rows"])
    server = results["server"][str(serve_bundles["lalm"])]
    assert [row["after"] for row in server] == ["start", "speech-5s.wav", "speech-60s.wav", "speech-5s.wav", "speech-60s.wav", "speech-5s.wav"]
    assert "| speech-60s.wav |" in (out / "report.md").read_text()
    again = run_main(bench_main, *argv, capsys=capsys)
    assert_user_error(again, "already holds results; pass --force")


def test_long_form_refuses_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    result = run_main(bench_main, "long-form", "--bundle", tmp_path, "--out", tmp_path / "out", capsys=capsys)
    assert_user_error(result, "is not a bundle (no manifest.json)")
    assert not (tmp_path / "out").exists()
