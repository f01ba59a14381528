"""One gate's comparison and its report: every output of every case against the eager
module (max-abs, relative error, cosine of the whole and of the worst row, NaN and inf
counted), then one `ParityError` that lists each output against its tolerance."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lalm_export.errors import ParityError
from lalm_export.parity.bounds import Tolerance


def cosine_similarities(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Cosine of the whole tensors, and the minimum over rows (a frame's or a position's
    vector along the last axis). Callers pass finite values: NaN is counted, not averaged."""
    a = reference.astype(np.float64).reshape(-1, reference.shape[-1])
    b = candidate.astype(np.float64).reshape(-1, candidate.shape[-1])
    whole = float(np.sum(a * b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))
    rows = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    return whole, float(rows.min())


def nonfinite_count(values: np.ndarray) -> int:
    return int(values.size - np.count_nonzero(np.isfinite(values)))


@dataclass
class OutputError:
    """One output's disagreement over every case. A NaN or inf on either side fails the gate
    whatever the other figures say: the statistics below are taken over finite values only
    (a NaN would otherwise drop out of max/min and read as agreement)."""

    max_abs: float = 0.0
    relative: float = 0.0
    cosine: float = 1.0
    row_cosine: float = 1.0
    nonfinite_eager: int = 0
    nonfinite_onnx: int = 0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        self.nonfinite_eager += nonfinite_count(reference)
        self.nonfinite_onnx += nonfinite_count(candidate)
        if self.nonfinite_eager or self.nonfinite_onnx:
            reference, candidate = np.nan_to_num(reference, nan=0.0, posinf=0.0, neginf=0.0), np.nan_to_num(candidate, nan=0.0, posinf=0.0, neginf=0.0)
        diff = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)), initial=0.0))
        scale = float(np.max(np.abs(reference), initial=0.0)) or 1.0
        whole, rows = cosine_similarities(reference, candidate)
        self.max_abs = max(self.max_abs, diff)
        self.relative = max(self.relative, diff / scale)
        self.cosine = min(self.cosine, whole)
        self.row_cosine = min(self.row_cosine, rows)

    @property
    def nonfinite(self) -> int:
        return self.nonfinite_eager + self.nonfinite_onnx

    def passes(self, tol: Tolerance) -> bool:
        if self.nonfinite:
            return False
        if tol.cosine is not None:
            return self.cosine >= tol.cosine and self.row_cosine >= (tol.row_cosine or tol.cosine)
        return self.relative <= tol.relative or (tol.absolute is not None and self.max_abs <= tol.absolute)

    def describe_nonfinite(self) -> str:
        sides = [f"{count} in {side}" for side, count in (("eager PyTorch", self.nonfinite_eager), ("ONNX Runtime", self.nonfinite_onnx)) if count]
        return f"NaN or inf values ({', '.join(sides)})"

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class ParityReport:
    tolerance: Tolerance
    cases: list[str] = field(default_factory=list)
    outputs: dict[str, OutputError] = field(default_factory=dict)
    greedy: dict[str, Any] | None = None
    reference: str = "eager PyTorch fp32 (merged)"
    output_tolerances: dict[str, Tolerance] = field(default_factory=dict)  # outputs held to other bounds than `tolerance`

    def tolerance_of(self, name: str) -> Tolerance:
        return self.output_tolerances.get(name, self.tolerance)

    @property
    def passed(self) -> bool:
        bound = self.tolerance.greedy_agreement
        greedy_ok = self.greedy is None or bound is None or self.greedy["agreement"] >= bound
        return greedy_ok and all(err.passes(self.tolerance_of(name)) for name, err in self.outputs.items())

    def record(self, name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance | None = None) -> None:
        """Add one case's `name` output; `tolerance`: its own bounds (a part of another precision)."""
        if reference.shape != candidate.shape:
            raise ParityError(f"output {name}: ONNX shape {candidate.shape} differs from eager shape {reference.shape}")
        if tolerance is not None:
            self.output_tolerances[name] = tolerance
        self.outputs.setdefault(name, OutputError()).update(reference, candidate)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": True,
            "passed": self.passed,
            "reference": self.reference,
            "tolerance": self.tolerance.to_dict(),
            **({"output_tolerances": {n: t.to_dict() for n, t in self.output_tolerances.items()}} if self.output_tolerances else {}),
            "cases": self.cases,
            "outputs": {n: e.to_dict() for n, e in self.outputs.items()},
            "greedy": self.greedy,
        }

    def summary_lines(self) -> list[str]:
        lines = [
            f"{name}: {err.describe_nonfinite()} FAIL"
            if err.nonfinite
            else f"{name}: max-abs {err.max_abs:.3g}, relative {err.relative:.3g}, cosine {err.cosine:.6f} (min per row {err.row_cosine:.6f}) "
            f"({_describe(self.tolerance_of(name))}) {'ok' if err.passes(self.tolerance_of(name)) else 'FAIL'}"
            for name, err in self.outputs.items()
        ]
        if self.greedy is not None:
            g = self.greedy
            lines.append(
                f"greedy tokens: {g['agreement']:.0%} of {g['steps']} steps agree"
                + (f", first divergence at step {g['first_divergence']}" if g["first_divergence"] is not None else "")
            )
        return lines

    def gate(self, say: Callable[[str], None]) -> dict[str, Any]:
        """Say the summary, refuse (`ParityError`) when failed; the manifest's parity record."""
        for line in self.summary_lines():
            say(f"      {line}")
        self.raise_if_failed()
        return self.to_dict()

    def raise_if_failed(self) -> None:
        if any(err.nonfinite for err in self.outputs.values()):
            broken = "; ".join(self.summary_lines())
            raise ParityError(f"NaN or inf in the outputs, so nothing can be verified: {broken}; check the weights (--weights, --adapter) for NaN")
        if not self.passed:
            raise ParityError(f"ONNX graph disagrees with {self.reference}: " + "; ".join(self.summary_lines()))


def _describe(tol: Tolerance) -> str:
    return f"cosine >= {tol.cosine:g}, per-row >= {tol.row_cosine or tol.cosine:g}" if tol.cosine is not None else f"tolerance {tol.relative:g}"
