"""The audio LLM end to end on a task whose answer is in the audio: DTMF key tones. A tiny
LALM is trained briefly, exported, and the torch-free runtime must get the keys of held-out
clips right, token for token as eager does."""

from __future__ import annotations

import numpy as np
import pytest

from lalm_export.dtmf import HELD_OUT_SEED, WINDOW_SECONDS, build_dtmf_lalm, curriculum, dtmf_examples, key_accuracy, train_dtmf
from lalm_export.export_lalm import export_lalm_bundle
from lalm_export.options import LalmExportOptions
from runtime.api import load
from runtime.generation import GenerationOptions


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


@pytest.mark.slow
def test_a_trained_lalm_transcribes_held_out_keys_through_the_runtime(tmp_path):
    model = build_dtmf_lalm(tmp_path / "checkpoints")
    train_dtmf(model, steps=1200)
    model.save_pretrained(tmp_path / "lalm")
    manifest = export_lalm_bundle(LalmExportOptions(lalm=tmp_path / "lalm", output=tmp_path / "bundle"), quiet=True)
    assert manifest.parity["passed"] and manifest.parity["greedy"]["agreement"] == 1.0
    held_out = dtmf_examples(48, seed=HELD_OUT_SEED)
    runner = load(tmp_path / "bundle")
    onnx = runner.transcribe([clip for clip, _ in held_out], options=GenerationOptions(max_new_tokens=8))
    keys = [k for _, k in held_out]
    assert key_accuracy(keys, [o.text for o in onnx]) >= 0.9
    eager = model.generate([clip for clip, _ in held_out], max_new_tokens=8)
    assert [o.tokens for o in onnx] == [tokens for _, tokens in eager]
