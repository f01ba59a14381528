"""`make demo` as a new user runs it (fewer LoRA steps; the audio LLM's full training): every
section runs, the bundles it writes passed their parity gates, and the audio LLM trained on
DTMF key tones gets at least 90 % of the keys of 64 held-out clips right through the torch-free
runtime, with eager's tokens for every clip."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import run_cli


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
