"""`python -m benchmarks serve-load` on tiny bundles: every phase answered, the overload phase
refused with 503s and nothing else, and a report with its plot."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main as bench_main
from tests.helpers import assert_user_error, run_main


def test_serve_load_reports_throughput_latency_and_overload(serve_bundles, tmp_path, capsys):
    out = tmp_path / "serve"
    args = ["serve-load", "--bundle", serve_bundles["wav2vec2"], serve_bundles["lalm"], serve_bundles["llm"], "--concurrency", 1, 3, "--requests", 6]
    args += ["--overload-clients", 8, "--overload-queue", 1, "--max-new-tokens", 4, "--decode-tokens", 8]
    result = run_main(bench_main, *args, "--out", out, "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("python -m benchmarks serve-load") and results["machine"]["cores"]
    for row in results["bundles"]:
        assert [p["clients"] for p in row["concurrency"]] == [1, 3]
        for phase in row["concurrency"]:
            assert phase["statuses"] == {"200": 6} and phase["throughput_rps"] > 0 and phase["vs_sequential"] > 0
            assert phase["latency_s"]["p50"] <= phase["latency_s"]["p99"]
        assert set(row["overload"]["statuses"]) <= {"200", "503"} and row["overload"]["statuses"].get("503", 0) > 0
        scaling = row["decode_step_ms_by_batch" if row["role"] == "decoder" else "encoder_ms_per_clip_by_batch"]
        assert row["peak_rss_mib"] > 0 and set(scaling) == {"1", "4", "16"}
    by_role = {row["role"]: row for row in results["bundles"]}
    assert by_role["lalm"]["concurrency"][0]["ttft_s"]["p50"] > 0 and by_role["lalm"]["turn_policy"]["short_during_long_s"] > 0
    in_process = by_role["decoder"]["streams_in_process"]  # 1 and 3 streams through one scheduler, two completions each
    assert [run["streams"] for run in in_process] == [1, 3] and all(run["tokens_per_s"] > 0 for run in in_process)
    for run in in_process:
        assert run["step_s"] + run["prefill_s"] + run["rest_s"] == pytest.approx(run["wall_s"], abs=0.002) and run["steps"] >= 7
    assert by_role["encoder"]["staggered"] is None
    for row in (by_role["decoder"], by_role["lalm"]):  # the most clients again, started over one request's time alone
        staggered = row["staggered"]
        assert staggered["clients"] == 3 and staggered["statuses"] == {"200": 6}
        assert staggered["stagger_s"] == row["concurrency"][0]["latency_s"]["p50"] and staggered["server_ttft_s"]["mean"] > 0
    for phase in [*by_role["decoder"]["concurrency"], by_role["decoder"]["staggered"]]:  # every request's 8 tokens came from decode steps the histogram counted
        batches = phase["decode_batches"]
        assert batches["steps"] * batches["mean_rows"] == pytest.approx(6 * 7, abs=0.01 * batches["steps"])
        assert phase["tokens_per_s"] > 0 and 0 < phase["server_ttft_s"]["mean"] < phase["latency_s"]["p99"]
    assert by_role["decoder"]["concurrency"][0]["vs_one_client"] == 1.0 and by_role["decoder"]["concurrency"][0]["decode_batches"]["mean_rows"] == 1.0
    report = (out / "report.md").read_text()
    assert "| 3, staggered |" in report and "python -m benchmarks serve-load" in report and (out / "serve-load.png").stat().st_size > 10_000


def test_serve_load_refuses_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    result = run_main(bench_main, "serve-load", "--bundle", tmp_path, "--out", tmp_path / "out", capsys=capsys)
    assert_user_error(result, "is not a bundle (no manifest.json)")
