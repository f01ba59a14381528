"""`python -m benchmarks pretrained-lalm`: a Hugging Face audio-LLM checkpoint against its
bundles, end to end, at tiny sizes here (the committed run is at real sizes)."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main as bench_main
from tests.helpers import assert_user_error, run_main

TINY_TOWER = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 128, "num_mel_bins": 128}
TINY_DECODER = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 1024, "tie_word_embeddings": True,
}  # fmt: skip


@pytest.mark.slow
def test_the_checkpoint_is_timed_against_its_bundles_end_to_end(tmp_path, monkeypatch, capsys):
    import benchmarks.pretrained_lalm as bench

    monkeypatch.setattr(bench, "TOWER", TINY_TOWER)
    monkeypatch.setattr(bench, "DECODER", TINY_DECODER)
    result = run_main(bench_main, "pretrained-lalm", "--out", tmp_path / "out", "--work", tmp_path / "work", "--tokens", 8, "--repeats", 1, capsys=capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert {"eager-fp32", "onnx-fp32", "onnx-int8"} <= set(rows)
    assert rows["onnx-fp32"]["parity"]["figures"]["greedy_agreement"] == 1.0  # the bundle's tokens are the checkpoint's own
    for row in rows.values():
        split = row["split_s"]
        assert all(split[part] > 0 for part in ("encoder_s", "prefill_s", "decode_s"))
        assert sum(split.values()) <= row["latency_s"]["median"] * 1.05
        assert row["speedups"]["end to end vs eager-fp32"]["value"] > 0
    assert all(e["parity_gate"] == "passed" and e["peak_rss_gib"] > 0 for e in report["exports"])
    assert (tmp_path / "out" / "split.png").stat().st_size > 0
    assert "| onnx-fp32 |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--seconds", "40"], "--seconds must be in (0, 30]"),
        (["--repeats", "0"], "--tokens and --repeats at least 1"),
    ],
)
def test_bad_settings_are_one_line(argv, fragment, tmp_path, capsys):
    result = run_main(bench_main, "pretrained-lalm", "--out", tmp_path / "out", *argv, capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_results_already_there_are_not_overwritten(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    result = run_main(bench_main, "pretrained-lalm", "--out", tmp_path / "out", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "already holds results; pass --force")
    assert (tmp_path / "out" / "results.json").read_text() == "{}"
