"""The optional spoken-digits task: its data where espeak-ng is installed, and a clear error
where it is not (its training and accuracy run in `make demo-spoken`, never in the tests)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from lalm_export.demo.run import main as demo_main
from lalm_export.demo.spoken_digits import RATE, WINDOW_SECONDS, spoken_examples


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (the task is optional)")
def test_spoken_clips_fit_the_window_and_seeds_repeat():
    examples = spoken_examples(12, seed=3)
    assert all(1 <= len(digits) <= 4 and digits.isdigit() for _, digits in examples)
    assert all(RATE // 4 < len(clip) <= WINDOW_SECONDS * RATE and np.isfinite(clip).all() for clip, _ in examples)
    again = spoken_examples(2, seed=3)
    assert np.array_equal(again[0][0], examples[0][0]) and again[1][1] == examples[1][1]


def test_the_spoken_digits_demo_without_espeak_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("a user's file")
    assert demo_main(["--spoken-digits", "--out", str(tmp_path / "out")]) == 1
    assert "needs espeak-ng on PATH (Debian/Ubuntu: apt-get install espeak-ng)" in capsys.readouterr().err
    assert (tmp_path / "out" / "kept.txt").read_text() == "a user's file"  # nothing run, nothing removed
