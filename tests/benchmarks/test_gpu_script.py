"""benchmarks/gpu/run.sh --dry-run: every step of the GPU run is wired, on the CPU."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import zipfile

import pytest

from tests.helpers import REPO, SUBPROCESS_TIMEOUT_S

pytestmark = pytest.mark.slow  # each builds a virtual environment and runs the whole GPU script on the CPU


def run_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "benchmarks/gpu/run.sh"), *args], capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S)


def script_env(tmp_path) -> dict[str, str]:
    import sys

    return {**os.environ, "STORE": str(tmp_path / "store"), "SITE": str(tmp_path / "site"), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}


def make_wheel(path) -> bytes:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("demo-1.0.dist-info/METADATA", "Name: demo\nVersion: 1.0\n")
    return path.read_bytes()


def test_dry_run_runs_every_step_and_writes_results(tmp_path):
    out = tmp_path / "out"
    # One family per role (a log-mel encoder, the decoder, the audio LLM): the GPU run's default is all of them.
    result = run_script("--dry-run", "--out", str(out), "--", "--families", "whisper", "llm", "lalm", env=script_env(tmp_path))
    assert result.returncode == 0, result.stderr
    for step in ("1/5 stash", "2/5 assemble", "3/5 install", "4/5 check", "5/5 benchmark (tiny preset, provider cpu)"):
        assert step in result.stderr
    results = json.loads((out / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} >= {"onnx-fp32", "onnx-fp16", "eager-fp32"}
    lalm = {r["variant"]: r for r in results["rows"] if r["family"] == "lalm"}  # the audio LLM, fp16 parts included
    assert set(lalm) >= {"eager-fp32", "onnx-fp32", "onnx-fp16"} and lalm["onnx-fp16"]["parts"] == {"encoder": "fp16", "decoder": "fp16"}
    assert lalm["onnx-fp32"]["parity"]["passed"]
    assert all(r["parity"]["passed"] for r in results["rows"] if r["runtime"] == "onnx" and r["family"] != "lalm")
    assert (out / "report.md").is_file()
    probe = json.loads((out / "conv_probe.json").read_text())
    assert probe["chosen"] == "EXHAUSTIVE" and all("median_ms" in row for row in probe["rows"])
    assert "cuDNN plan search for the benchmark: EXHAUSTIVE" in result.stderr


def test_parts_carried_over_several_calls_are_assembled_and_checked(tmp_path):
    env = script_env(tmp_path)
    wheel_bytes = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl")
    half = len(wheel_bytes) // 2
    for index, chunk in enumerate((wheel_bytes[:half], wheel_bytes[half:])):
        call = tmp_path / f"call-{index + 1}"
        call.mkdir()
        (call / f"demo-1.0-py3-none-any.whl.part-{index:02d}").write_bytes(chunk)
        if index == 0:
            (call / "demo-1.0-py3-none-any.whl.sha256").write_text(hashlib.sha256(wheel_bytes).hexdigest() + "\n")
    first = run_script("--stash", str(tmp_path / "call-1"), env=env)
    assert first.returncode == 0 and "nothing else to do" in first.stderr
    incomplete = run_script("--out", str(tmp_path / "o"), env=env)  # a real run with a part missing stops
    assert incomplete.returncode == 1 and "incomplete" in incomplete.stderr and not (tmp_path / "site").exists()
    run_script("--stash", str(tmp_path / "call-2"), env=env)
    dry = run_script("--dry-run", "--out", str(tmp_path / "o"), "--", "--families", "llm", env=env)  # the assembly is what is checked
    assert "assembled from 2 parts" in dry.stderr and "1 wheel(s) valid" in dry.stderr
    assert (tmp_path / "store" / "demo-1.0-py3-none-any.whl").read_bytes() == wheel_bytes


def test_unknown_argument_is_a_clear_error(tmp_path):
    result = run_script("--bogus", env=script_env(tmp_path))
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr
