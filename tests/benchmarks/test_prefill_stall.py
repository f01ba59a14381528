"""`python -m benchmarks prefill-stall` end to end on the tiny test decoder: the long prompt goes in
chunks of the budget (as many graph calls as chunks) against one prefill, the report; and its
refusals."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main as bench_main
from tests.helpers import assert_user_error, run_main


def test_prefill_stall_chunks_the_long_prompt_and_reports_both_ways(serve_bundles, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_main(
        bench_main, "prefill-stall", "--bundle", serve_bundles["llm"], "--positions", 40, "--budget", 16, "--rounds", 1, "--out", out, capsys=capsys
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    chunked, whole = results["figures"]["chunked"], results["figures"]["whole"]
    assert (chunked["budget"], chunked["prefill_calls"]) == (16, 3)  # 16 + 16 + 8 positions
    assert (whole["budget"], whole["prefill_calls"]) == (40, 1)
    assert all(row["longest_gap_ms"] > 0 and row["ttft_ms"] > 0 for row in (chunked, whole))
    assert results["machine"]["cpu_flags"] and "| chunked | 16 | 3 |" in (out / "report.md").read_text()


def test_prefill_stall_refuses_an_audio_llm_bundle(serve_bundles, tmp_path, capsys):
    result = run_main(bench_main, "prefill-stall", "--bundle", serve_bundles["lalm"], "--out", tmp_path / "out", capsys=capsys)
    assert_user_error(result, "prefill-stall measures a decoder bundle's scheduler")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--budget", 0), ("--positions", 1), ("--rounds", 0)])
def test_prefill_stall_refuses_counts_out_of_range(flag, value, serve_bundles, tmp_path, capsys):
    result = run_main(bench_main, "prefill-stall", "--bundle", serve_bundles["llm"], flag, value, "--out", tmp_path / "out", capsys=capsys)
    assert_user_error(result, "--positions must be at least 2, --rounds and --budget at least 1")
