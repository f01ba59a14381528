"""The DTMF task's data. Training, export and the runtime's accuracy on held-out clips are
tested through the demo, which runs them as a user does (`tests/demo/test_demo.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from lalm_export.demo.dtmf import WINDOW_SECONDS, curriculum, dtmf_examples, edit_error_rate, key_accuracy


def test_clips_fit_the_window_and_seeds_repeat():
    examples = dtmf_examples(200, seed=3)
    assert all(3 <= len(keys) <= 6 and keys.isdigit() for _, keys in examples)
    assert max(len(clip) for clip, _ in examples) <= WINDOW_SECONDS * 16_000
    again = dtmf_examples(2, seed=3)
    assert np.array_equal(again[0][0], examples[0][0]) and again[1][1] == examples[1][1]
    assert [curriculum(s, 1200) for s in (0, 99, 100, 299, 300, 1199)] == [(1, 1), (1, 1), (1, 3), (1, 3), (3, 6), (3, 6)]


def test_key_accuracy_counts_keys_in_place():
    assert key_accuracy(["1234", "56"], ["1234", "56"]) == 1.0
    assert key_accuracy(["1234", "56"], ["1204", "5"]) == pytest.approx(4 / 6)
    assert key_accuracy(["12"], [""]) == 0.0


def test_edit_error_rate_charges_a_dropped_key_once():
    assert edit_error_rate(["1234", "56"], ["1234", "56"]) == 0.0
    assert edit_error_rate(["1234"], ["234"]) == pytest.approx(1 / 4)  # key_accuracy: 0 of 4 in place
    assert edit_error_rate(["12", "3"], ["1", "39"]) == pytest.approx(2 / 3)
