"""One rule gives every graph its parity bounds: the component gate, the LALM gate and the
benchmarks' parity columns read the same table, so a result the benchmarks pass is one the
export would have accepted."""

from __future__ import annotations

import itertools

import pytest

from benchmarks.run import parity_bounds, parity_passes
from lalm_export.parity.bounds import COSINE_BOUNDS, FP32_RELATIVE, gate_tolerance
from lalm_export.parity.report import OutputError


def test_fp32_is_gated_on_relative_error_and_every_greedy_token():
    tolerance = gate_tolerance("fp32", "decoder", min_cosine=0.5)  # --min-cosine has no say over fp32
    assert (tolerance.cosine, tolerance.relative, tolerance.greedy_agreement) == (None, FP32_RELATIVE, 1.0)


@pytest.mark.parametrize(
    "precision, role, bound",
    [("int8", "encoder", (0.999, 0.995)), ("fp16", "encoder", (0.999, 0.995)), ("int8", "decoder", (0.99, 0.98)), ("int4", "decoder", (0.8, 0.8))],
)
def test_reduced_precisions_are_gated_on_cosine_and_record_greedy_agreement(precision, role, bound):
    tolerance = gate_tolerance(precision, role)
    assert (tolerance.cosine, tolerance.row_cosine) == bound and tolerance.greedy_agreement is None
    assert (gate_tolerance(precision, role, min_cosine=0.9).cosine, gate_tolerance(precision, role, min_cosine=0.9).row_cosine) == (0.9, 0.9)


def test_an_audio_llm_gates_greedy_tokens_only_where_every_graph_is_fp32():
    assert gate_tolerance("fp32", "encoder", greedy_precisions=["fp32"]).greedy_agreement == 1.0
    assert gate_tolerance("fp32", "encoder", greedy_precisions=["int4"]).greedy_agreement is None
    assert gate_tolerance("int8", "encoder", greedy_precisions=["fp32"]).greedy_agreement is None


def figures_of(error: OutputError, greedy: float) -> dict[str, float]:
    return {**error.to_dict(), "greedy_agreement": greedy}


PRECISIONS = [("fp32", role) for role in ("encoder", "decoder")] + [(p, role) for p, roles in COSINE_BOUNDS.items() for role in roles]


@pytest.mark.parametrize("precision, role", PRECISIONS)
def test_the_benchmarks_pass_exactly_what_the_export_gate_passes(precision, role):
    tolerance = gate_tolerance(precision, role)
    bounds = parity_bounds(role, precision)
    for relative, cosine, row_cosine, nonfinite, greedy in itertools.product(
        (0.0, 0.9 * FP32_RELATIVE, 2 * FP32_RELATIVE), (1.0, 0.9995, 0.995, 0.9, 0.5), (1.0, 0.996, 0.985, 0.7), (0, 3), (1.0, 0.5)
    ):
        error = OutputError(max_abs=relative, relative=relative, cosine=cosine, row_cosine=row_cosine, nonfinite_onnx=nonfinite)
        gate = error.passes(tolerance) and (role != "decoder" or tolerance.greedy_agreement is None or greedy >= tolerance.greedy_agreement)
        assert parity_passes(figures_of(error, greedy), bounds) == gate, (relative, cosine, row_cosine, nonfinite, greedy)
