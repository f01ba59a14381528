"""`make demo` as a new user runs it (fewer LoRA steps; the audio LLM's full training): every
section runs, the bundles it writes passed their parity gates, and the audio LLM trained on
DTMF key tones gets at least 90 % of the keys of 64 held-out clips right through the torch-free
runtime, with eager's tokens for every clip."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf

from lalm_export.demo.run import DEMO_MARK, prepare_out
from lalm_export.demo.run import main as demo_main
from tests.helpers import assert_user_error, run_cli, run_main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("--steps", "2", "--out", out, module="lalm_export.demo", timeout=1200)
    assert result.returncode == 0, result.stderr
    for section in range(1, 9):
        assert f"== {section}. " in result.stdout
    assert "Traceback" not in result.stderr and "Failed to load CPU gemm_4bit_forward" not in result.stderr
    manifests = sorted(out.glob("bundles/*/manifest.json"))
    assert len(manifests) == 5  # wav2vec2 fp32 and int8, llm fp32 and int4, the audio LLM
    assert all(json.loads(m.read_text())["parity"]["passed"] for m in manifests)
    onnx_row = next(line for line in result.stdout.splitlines() if line.startswith("| ONNX Runtime (runtime.api)"))
    accuracy = float(re.search(r"\| ([0-9.]+)% +\|", onnx_row).group(1))
    assert accuracy >= 90.0, onnx_row
    assert re.search(r"\| 64/64 +\|$", onnx_row), onnx_row  # every held-out clip: the runtime's tokens are eager's
    assert (out / "features.npz").is_file()
    check_a_long_dtmf_recording(out / "bundles" / "dtmf-lalm", tmp_path / "dtmf-5min.wav")


def check_a_long_dtmf_recording(bundle, path) -> None:
    """The 64 held-out clips in one recording of five minutes, 3.5-5 s of quiet noise between
    them: cut by the bundle's splitter (energy, recorded by the demo's export) into one piece
    per clip, with the key accuracy of the clips transcribed one by one."""
    from lalm_export.demo.dtmf import HELD_OUT_SEED, dtmf_examples, key_accuracy
    from runtime.api import load
    from runtime.generation import GenerationOptions

    examples, rng = dtmf_examples(64, seed=HELD_OUT_SEED), np.random.default_rng(1)
    parts = [part for clip, _ in examples for part in (clip, 0.002 * rng.standard_normal(int(rng.uniform(3.5, 5.0) * 16_000)))]
    sf.write(path, np.concatenate(parts).astype(np.float32), 16_000, subtype="PCM_16")
    runner, options, keys = load(bundle), GenerationOptions(max_new_tokens=16), [k for _, k in examples]
    assert runner.split_for(None) == "energy"
    alone = key_accuracy(keys, [r.text.replace(" ", "") for r in runner.transcribe([clip for clip, _ in examples], None, options)])
    recording = runner.transcribe(path, None, options)[0]
    assert len(recording.segments) == 64
    assert key_accuracy(keys, [s.text.replace(" ", "") for s in recording.segments]) >= alone - 0.01


def test_a_folder_the_demo_did_not_write_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    assert_user_error(run_main(demo_main, "--out", out, capsys=capsys), "holds files the demo did not write")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "a user's file"
    (tmp_path / "file").write_text("x")
    assert_user_error(run_main(demo_main, "--out", tmp_path / "file", capsys=capsys), "is a file; pass a folder")


def test_a_folder_an_earlier_run_wrote_is_replaced(tmp_path):
    out = tmp_path / "demo"
    prepare_out(out)
    (out / "bundles").mkdir()
    (out / "bundles" / "stale.onnx").write_bytes(b"old")
    prepare_out(out)
    assert [p.name for p in out.iterdir()] == [DEMO_MARK]


@pytest.mark.parametrize("flag", ["--steps", "--lalm-steps", "--spoken-steps"])
def test_step_counts_below_one_are_refused_before_any_work(flag, tmp_path, capsys):
    result = run_main(demo_main, flag, "0", "--out", tmp_path / "demo", capsys=capsys)
    assert result.returncode == 2 and "expected a whole number of steps, 1 or more, not '0'" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_a_precision_the_gate_refuses_is_reported_and_the_demo_goes_on(checkpoints, tmp_path):
    """What a precision loses depends on the CPU's int8 kernels: the demo reports a refusal
    (here forced by a bound no int8 graph meets) instead of dying with a traceback."""
    from dataclasses import replace

    from lalm_export.demo.run import export_reduced
    from lalm_export.export.component import ExportOptions

    options = ExportOptions(family="wav2vec2", model=str(checkpoints["wav2vec2"]), output=tmp_path / "int8", precision="int8")
    refused = export_reduced(replace(options, min_cosine=1.0))
    assert isinstance(refused, str) and refused.startswith("ONNX graph disagrees with eager PyTorch fp32") and "\n" not in refused
    assert not (tmp_path / "int8").exists()
    assert export_reduced(options).parity["passed"]
