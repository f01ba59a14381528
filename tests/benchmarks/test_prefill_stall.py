"""`python -m benchmarks prefill-stall` end to end on the tiny test decoder: the long prompt goes in
chunks of the budget (as many graph calls as chunks) against one prefill, the report; and its
refusals."""

from __future__ import annotations

import json

import numpy as np
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


def test_a_stream_that_fills_its_context_starts_over_and_the_round_completes(serve_bundles):
    """On a loaded machine the stream can outrun the long prompt; it must start over, not step
    past its context (that error, raised in its thread, once left the prompt waiting forever)."""
    from benchmarks.prefill_stall import WARM_STEPS, one_round
    from runtime.api import load

    class ShortContext:
        """The bundle's model with a context of room for a few steps after the stream's 16 tokens."""

        def __init__(self, model):
            self.model, self.context_length = model, 16 + WARM_STEPS + 2

        def new_scheduler(self, **options):
            return self.model.new_scheduler(**options)

    figures = one_round(ShortContext(load(serve_bundles["llm"])), 8, np.arange(3, 43)[None], seed=0, vocabulary=100)
    assert figures["ttft_ms"] > 0 and figures["prefill_calls"] >= 1


def test_a_stream_that_fails_while_the_long_prompt_waits_ends_the_round_with_its_error(serve_bundles):
    """The stream's thread fails once the long prompt has begun (its chunks wait for the stream's
    steps): the prompt goes on without it and the round raises the stream's error, instead of
    waiting forever."""
    import threading

    from benchmarks.prefill_stall import one_round
    from runtime.api import load

    began = threading.Event()

    class FailingStream:
        def __init__(self, member):
            self.member = member

        def __getattr__(self, name):
            return getattr(self.member, name)

        def decode_step(self, tokens):
            if began.is_set():
                raise RuntimeError("the stream's step failed")
            return self.member.decode_step(tokens)

    class LongPrompt(FailingStream):
        def prefill(self, ids, mask):
            began.set()
            return self.member.prefill(ids, mask)

    class Scheduler:
        def __init__(self, scheduler):
            self.scheduler, self.members = scheduler, 0

        def member(self):
            self.members += 1
            return (FailingStream if self.members == 1 else LongPrompt)(self.scheduler.member())  # the stream, then the long prompt

    class Model:
        def __init__(self, model):
            self.model, self.context_length = model, model.context_length

        def new_scheduler(self, **options):
            return Scheduler(self.model.new_scheduler(**options))

    with pytest.raises(RuntimeError, match="the stream's step failed"):
        one_round(Model(load(serve_bundles["llm"])), 8, np.arange(3, 43)[None], seed=0, vocabulary=100)
