"""The embedding measurement compares like with like: the in-graph embedding gives exactly the
host table's rows, with the audio frames at the placeholder."""

from __future__ import annotations

from benchmarks.embedding import run


def test_in_graph_and_host_embeddings_are_identical_and_both_timed():
    results = run(vocab=1000, hidden=64, frames=10, prompt_tokens=5, repeats=3)
    assert results["identical"] and results["faster"] in results["per_generation_us"]
    assert all(value > 0 for value in results["median_us"].values())
