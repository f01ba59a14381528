"""Every bound of the parity gate, with its reason, and the one rule that gives a graph its
bounds: the component gate, the LALM gate and the benchmarks all ask `gate_tolerance`.
Relative error is max|a - b| / max|reference|."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# ONNX Runtime fp32 vs eager PyTorch fp32: same math, different kernels and op order.
FP32_RELATIVE = 1e-4
# Greedy decoding must agree exactly at fp32; this is the number of steps checked.
GREEDY_STEPS = 24

# Reduced precisions are gated against eager fp32 on cosine similarity: of the whole output
# and of its worst row (an encoder frame, a decoder position's logits). Encoder bounds are
# the accuracy targets of int8/fp16 serving; decoder logits on random weights are flat, so
# their cosine is lower than on trained weights (docs/performance-notes.md has both).
ENCODER_COSINE, ENCODER_ROW_COSINE = 0.999, 0.995
DECODER_COSINE, DECODER_ROW_COSINE = 0.99, 0.98
# int4 weights on random weights: their logits' cosine falls with depth (24 layers compound
# the error; docs/performance-notes.md has the figures). A broken graph scores near 0; trained
# weights far better, and --min-cosine raises the bound for them.
INT4_DECODER_COSINE, INT4_DECODER_ROW_COSINE = 0.8, 0.8


@dataclass(frozen=True)
class CosineBound:
    """Cosine against eager fp32, of the whole output and of its worst row."""

    cosine: float
    row_cosine: float


_REDUCED = {"encoder": CosineBound(ENCODER_COSINE, ENCODER_ROW_COSINE), "decoder": CosineBound(DECODER_COSINE, DECODER_ROW_COSINE)}

# precision -> role -> bound. A precision without a row (fp32) is gated on relative error.
COSINE_BOUNDS: dict[str, dict[str, CosineBound]] = {
    "fp16": _REDUCED,
    "int8": _REDUCED,
    "int4": {"decoder": CosineBound(INT4_DECODER_COSINE, INT4_DECODER_ROW_COSINE)},
}


@dataclass(frozen=True)
class Tolerance:
    """fp32 graphs are gated on relative error; reduced precisions on cosine similarity,
    since their error is spread over every element rather than a rounding difference."""

    relative: float = FP32_RELATIVE
    absolute: float | None = None  # when set, an output also passes if max-abs <= absolute
    cosine: float | None = None  # when set: gate on cosine and per-row cosine instead of relative error
    row_cosine: float | None = None
    greedy_agreement: float | None = 1.0  # None: greedy agreement is recorded, not gated

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def figure_bounds(self, greedy: bool) -> dict[str, dict[str, float]]:
        """The same bounds as {figure: {"min"|"max": bound}}, for results that keep figures
        (the benchmarks'); `greedy`: the figures include greedy agreement. A NaN or inf fails."""
        finite = {"nonfinite_eager": {"max": 0}, "nonfinite_onnx": {"max": 0}}
        if self.cosine is not None:
            return {"cosine": {"min": self.cosine}, "row_cosine": {"min": self.row_cosine or self.cosine}, **finite}
        bounds: dict[str, dict[str, float]] = {"relative": {"max": self.relative}, **finite}
        if greedy and self.greedy_agreement is not None:
            bounds["greedy_agreement"] = {"min": self.greedy_agreement}
        return bounds


def cosine_bound(precision: str, role: str, min_cosine: float | None = None) -> CosineBound | None:
    """The cosine gate of a `precision` graph in `role` (`min_cosine`, `--min-cosine`, replaces
    both of its bounds); None: the graph is gated on relative error."""
    bound = COSINE_BOUNDS.get(precision, {}).get(role)
    if bound is None or min_cosine is None:
        return bound
    return CosineBound(min_cosine, min_cosine)


def greedy_bound(precisions: Iterable[str]) -> float | None:
    """Greedy tokens must all agree where every graph on the path is fp32; with any reduced
    precision they diverge wherever two logits are near-tied (random weights: everywhere), so
    their agreement is recorded, not gated."""
    return 1.0 if all(p == "fp32" for p in precisions) else None


def gate_tolerance(
    precision: str,
    role: str,
    min_cosine: float | None = None,
    relative: float = FP32_RELATIVE,
    absolute: float | None = None,
    greedy_precisions: Iterable[str] = (),
) -> Tolerance:
    """The gate of a `precision` graph in `role`: its cosine bound (or `min_cosine`) where it
    has one, else relative error (`relative`, or max-abs `absolute`); greedy agreement gated
    where this graph and `greedy_precisions` (the other graphs on the path) are all fp32."""
    bound = cosine_bound(precision, role, min_cosine)
    greedy = greedy_bound([precision, *greedy_precisions])
    if bound is None:
        return Tolerance(relative=relative, absolute=absolute, greedy_agreement=greedy)
    return Tolerance(relative=relative, absolute=absolute, cosine=bound.cosine, row_cosine=bound.row_cosine, greedy_agreement=greedy)
