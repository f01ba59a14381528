"""`python -m benchmarks real-lalm`: the held-out split, the error rates, the training views and
the command end to end (with a tiny LALM in place of the real one; the committed run is real)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from benchmarks import real_lalm
from benchmarks.__main__ import main as bench_main
from tests.helpers import assert_user_error, run_main

needs_corpus = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or not real_lalm.FORTUNES.is_dir(),
    reason="needs espeak-ng and fortunes (apt-get install espeak-ng fortunes; .ci/run installs them)",
)


@needs_corpus
def test_held_out_sentences_and_voices_are_never_trained_on():
    training, held_out = real_lalm.sentences()
    assert len(held_out) == real_lalm.HELD_OUT_SENTENCES and len(training) > 4000
    assert not set(training) & set(held_out)
    assert (training, held_out) == real_lalm.sentences(), "the split is fixed"
    for sentence in training[:500] + held_out:
        assert real_lalm.WORDS[0] <= len(sentence.split()) <= real_lalm.WORDS[1] and not any(ch.isdigit() for ch in sentence)
    assert not set(real_lalm.HELD_OUT_VOICES) & set(real_lalm.TRAIN_VOICES)
    assert not set(real_lalm.HELD_OUT_VARIANTS) & set(real_lalm.TRAIN_VARIANTS)


@needs_corpus
def test_the_held_out_clips_hold_the_recording_and_speech_in_held_out_voices():
    clips = real_lalm.held_out(3)
    assert [c.source for c in clips][0] == "recording" and clips[0].text == real_lalm.REAL_RECORDING_TEXT
    assert len(clips[0].audio) == 4 * 16_000  # the 4 s CMU ARCTIC recording at 16 kHz
    for clip in clips[1:]:
        voice = clip.source.removeprefix("espeak-ng ")
        assert any(voice.startswith(v + "+") for v in real_lalm.HELD_OUT_VOICES)
        assert 1.0 < len(clip.audio) / 16_000 <= real_lalm.WINDOW_SECONDS and np.isfinite(clip.audio).all()


def test_error_rates_compare_words_without_case_or_punctuation():
    assert real_lalm.error_rates(["The cat sat."], ["the cat, sat"]) == {"wer": 0.0, "cer": 0.0}
    rates = real_lalm.error_rates(["the cat sat", "a dog"], ["the cat sat down", "a frog"])
    assert rates["wer"] == pytest.approx(100 * 2 / 5, abs=0.01)  # one word added, one wrong, of five
    assert rates["cer"] == pytest.approx(100 * 7 / 16, abs=0.01)  # " down": 5 characters added; "dog" to "frog": 2 edits; of 11 + 5


def test_training_views_stay_in_the_window_at_their_levels():
    rng = np.random.default_rng(0)
    clip = np.sin(np.linspace(0, 2000, real_lalm.WINDOW_SECONDS * 16_000)).astype(np.float32)
    for _ in range(20):
        view = real_lalm.augmented(clip, rng)
        assert view.dtype == np.float32 and len(view) == len(clip) and np.isfinite(view).all()
        assert 0.15 < np.abs(view).max() < 2.0  # speech at 0.2-1.0 of full scale, noise 15 dB or more below it


@needs_corpus
def test_a_training_stopped_or_asked_for_more_steps_goes_on_from_its_last_save(tmp_path, monkeypatch):
    """A tiny LALM in place of the real one, saved every 4 steps: stopped at step 5 it keeps its
    record of 4 steps; asked again for 6 it trains 2 on from the save; asked for 6 once more it
    is reused; asked for 10, it trains 4 more."""
    from lalm_export.demo.training import build_tiny_lalm

    monkeypatch.setattr(real_lalm, "build_lalm", lambda cache: build_tiny_lalm(cache, real_lalm.WINDOW_SECONDS, real_lalm.PROMPT))
    monkeypatch.setattr(real_lalm, "TRAINING_POOL", 8)
    monkeypatch.setattr(real_lalm, "SAVE_EVERY", 4)
    calls = [0]
    loss = real_lalm.ctc_alignment_loss

    def stopped_at_step_5(*args):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(real_lalm, "ctc_alignment_loss", stopped_at_step_5)
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        real_lalm.trained_lalm(tmp_path, 6, said.append)
    record = tmp_path / "lalm" / real_lalm.TRAINED
    assert json.loads(record.read_text())["steps"] == 4
    monkeypatch.setattr(real_lalm, "ctc_alignment_loss", loss)
    folder = real_lalm.trained_lalm(tmp_path, 6, said.append)
    assert "training 2 steps (batch 8) on from step 4" in said[-1]
    first = json.loads(record.read_text())
    assert first["steps"] == 6 and [(run["from"], run["to"]) for run in first["runs"]] == [(0, 4), (4, 6)]
    assert real_lalm.trained_lalm(tmp_path, 6, said.append) == folder and said[-1].startswith("real-lalm: reusing the trained model")
    projector = (folder / "projector.safetensors").read_bytes()
    real_lalm.trained_lalm(tmp_path, 10, said.append)
    second = json.loads(record.read_text())
    assert second["steps"] == 10 and [(run["from"], run["to"]) for run in second["runs"]] == [(0, 4), (4, 6), (6, 10)]
    assert len(second["loss_per_100_steps"]) == 3  # one mean per run here (each under 100 steps)
    assert (folder / "projector.safetensors").read_bytes() != projector, "the resumed run trained the saved model"
    assert "in 3 runs, each resumed from the last save" in real_lalm.resumed(second)


@pytest.mark.slow
@needs_corpus
def test_the_command_trains_exports_transcribes_and_times_every_variant(checkpoints, tmp_path, monkeypatch, capsys):
    """A tiny Whisper-style LALM in place of the real one, 10 training steps on 16 spoken
    sentences: every variant exported and gated, each transcript scored, the recording timed."""
    from lalm_export.demo.training import build_tiny_lalm

    monkeypatch.setattr(real_lalm, "build_lalm", lambda cache: build_tiny_lalm(cache, real_lalm.WINDOW_SECONDS, real_lalm.PROMPT))
    monkeypatch.setattr(real_lalm, "TRAINING_POOL", 16)
    common = ("real-lalm", "--work", tmp_path / "work", "--clips", 2, "--tokens", 4, "--repeats", 1)
    result = run_main(bench_main, *common, "--steps", 10, "--out", tmp_path / "out", capsys=capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["settings"]["training"]["steps"] == 10
    assert {e["variant"] for e in report["exports"]} == set(real_lalm.VARIANTS)
    assert all(e["parity_gate"] == "passed" for e in report["exports"])
    accuracy = report["accuracy"]
    assert {"eager-fp32", "onnx-fp32", "onnx-fp32-int8", "onnx-int8", "onnx-int8-int4", "onnx-int8-int4-gptq"} <= set(accuracy)
    assert accuracy["onnx-fp32"]["same_as_eager_fp32"] == 3  # two sentences and the recording: the bundle's text is eager's
    assert all(0 <= a["held_out_speech"]["wer"] and 0 <= a["recording"]["cer"] for a in accuracy.values())
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["onnx-fp32"]["parity"]["figures"]["greedy_agreement"] == 1.0
    assert all(row["speedups"]["end to end vs eager-fp32"]["value"] > 0 for row in rows.values())
    assert "| onnx-int8-int4-gptq |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "wer-speed.png").stat().st_size > 0
    again = run_main(bench_main, *common, "--steps", 10, "--out", tmp_path / "again", capsys=capsys)
    assert "reusing the trained model" in again.stderr, "a finished training is reused, not repeated"


def test_the_report_says_which_bundles_miss_the_wer_target_by_how_much_and_which_part_loses_it():
    def rates(wer):
        return {"held_out_speech": {"wer": wer, "cer": 0.0}, "recording": {"wer": 0.0, "cer": 0.0}, "same_as_eager_fp32": 0}

    accuracy = {
        name: rates(wer)
        for name, wer in {"eager-fp32": 40.0, "eager-bf16": 45.0, "onnx-fp32": 40.0, "onnx-fp32-int8": 40.5, "onnx-int8": 44.0, "onnx-int8-int4": 50.0}.items()
    }
    lines = real_lalm.wer_misses(accuracy)
    assert lines == [
        "- **onnx-int8** misses by 3.0 points (+4.0 against eager fp32): the int8 decoder alone +0.5 (onnx-fp32-int8), the int8 encoder the other +3.5.",
        "- **onnx-int8-int4** misses by 9.0 points (+10.0 against eager fp32): the int4 decoder, +6.0 over the int8 bundle with the same encoder.",
    ]  # eager bf16 is no bundle; the fp32-encoder + int8-decoder bundle is within a point


def test_bad_settings_are_refused_in_one_line(tmp_path, capsys):
    result = run_main(bench_main, "real-lalm", "--work", tmp_path / "w", "--clips", 500, "--out", tmp_path / "out", capsys=capsys)
    assert_user_error(result, "--clips in 1..100")
    assert not (tmp_path / "out").exists()
