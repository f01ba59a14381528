"""The parity gate: ONNX Runtime against the eager module on fresh random inputs.

Every output of every case is compared; then one `ParityError` lists each output's
max-abs and relative error against its tolerance."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from torch import nn
from tqdm import tqdm

from lalm_export.errors import ParityError
from lalm_export.models.eager import EagerDecoderBackend, eager_encoder_outputs
from lalm_export.models.families import FamilySpec
from lalm_export.parity.bounds import FP32_RELATIVE, GREEDY_STEPS
from lalm_export.parity.signals import speech_like
from runtime.generation import GenerationOptions, generate
from runtime.ort_backends import decoder_backend


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

    @property
    def passed(self) -> bool:
        bound = self.tolerance.greedy_agreement
        greedy_ok = self.greedy is None or bound is None or self.greedy["agreement"] >= bound
        return greedy_ok and all(err.passes(self.tolerance) for err in self.outputs.values())

    def record(self, name: str, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise ParityError(f"output {name}: ONNX shape {candidate.shape} differs from eager shape {reference.shape}")
        self.outputs.setdefault(name, OutputError()).update(reference, candidate)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": True,
            "passed": self.passed,
            "reference": self.reference,
            "tolerance": self.tolerance.to_dict(),
            "cases": self.cases,
            "outputs": {n: e.to_dict() for n, e in self.outputs.items()},
            "greedy": self.greedy,
        }

    def summary_lines(self) -> list[str]:
        tol = self.tolerance
        bound = f"cosine >= {tol.cosine:g}, per-row >= {tol.row_cosine or tol.cosine:g}" if tol.cosine is not None else f"tolerance {tol.relative:g}"
        lines = [
            f"{name}: {err.describe_nonfinite()} FAIL"
            if err.nonfinite
            else f"{name}: max-abs {err.max_abs:.3g}, relative {err.relative:.3g}, cosine {err.cosine:.6f} (min per row {err.row_cosine:.6f}) "
            f"({bound}) {'ok' if err.passes(tol) else 'FAIL'}"
            for name, err in self.outputs.items()
        ]
        if self.greedy is not None:
            g = self.greedy
            lines.append(
                f"greedy tokens: {g['agreement']:.0%} of {g['steps']} steps agree"
                + (f", first divergence at step {g['first_divergence']}" if g["first_divergence"] is not None else "")
            )
        return lines

    def raise_if_failed(self) -> None:
        if any(err.nonfinite for err in self.outputs.values()):
            broken = "; ".join(self.summary_lines())
            raise ParityError(f"NaN or inf in the outputs, so nothing can be verified: {broken}; check the weights (--weights, --adapter) for NaN")
        if not self.passed:
            raise ParityError(f"ONNX graph disagrees with {self.reference}: " + "; ".join(self.summary_lines()))


def encoder_cases(spec: FamilySpec, seed: int, n_mels: int = 80) -> list[tuple[str, np.ndarray]]:
    """At least two batch sizes and two lengths (Whisper: its fixed 30 s window only), of
    noise and of speech-like audio: quiet stretches between syllables are where a reduced
    precision loses most."""
    rng = np.random.default_rng(seed)
    if not spec.dynamic_length:
        return [(f"batch {b}, 3000 frames", rng.standard_normal((b, n_mels, 3000)).astype(np.float32)) for b in (1, 2)]
    noise = [
        (f"noise, batch {b}, {samples / 16000:.2f} s", (0.1 * rng.standard_normal((b, samples))).astype(np.float32))
        for b in (1, 2)
        for samples in (16_000, 25_600)
    ]
    speech = [
        (f"speech-like, batch {b}, {seconds:.2f} s", np.stack([speech_like(seconds, seed=seed + i) for i in range(b)])) for b, seconds in ((1, 1.0), (2, 1.6))
    ]
    return noise + speech


def check_encoder(
    model: nn.Module,
    session: ort.InferenceSession,
    spec: FamilySpec,
    all_hidden_states: bool,
    tolerance: Tolerance,
    seed: int = 0,
    progress: bool = True,
) -> ParityReport:
    report = ParityReport(tolerance)
    cases = encoder_cases(spec, seed, n_mels=int(getattr(model.config, "num_mel_bins", 80)))
    names = [o.name for o in session.get_outputs()]
    for case, x in tqdm(cases, desc="verify", unit="case", disable=not progress, leave=False):
        reference = eager_encoder_outputs(model, spec.input_name, x, all_hidden_states)
        onnx_out = dict(zip(names, session.run(names, {spec.input_name: x})))
        for name in names:
            report.record(name, reference[name], onnx_out[name])
        report.cases.append(case)
    return report


def check_decoder(
    model: nn.Module,
    session: ort.InferenceSession,
    tolerance: Tolerance,
    vocab_size: int,
    seed: int = 0,
    steps: int = GREEDY_STEPS,
    progress: bool = True,
) -> ParityReport:
    """Last-position logits over prompts of two batch sizes and lengths, then greedy tokens."""
    report = ParityReport(tolerance)
    rng = np.random.default_rng(seed)
    eager, onnx = EagerDecoderBackend(model), decoder_backend(session)
    shapes = [(1, 5), (2, 9)]
    for batch, length in tqdm(shapes, desc="verify", unit="case", disable=not progress, leave=False):
        ids = rng.integers(3, vocab_size, size=(batch, length))
        mask = np.ones_like(ids)
        if batch > 1:
            mask[-1, : length // 3] = 0  # left padding in the last row
        report.record("logits (prefill)", eager.prefill(ids, mask), onnx.prefill(ids, mask))
        step_ids = rng.integers(3, vocab_size, size=(batch,))
        report.record("logits (decode step)", eager.decode_step(step_ids), onnx.decode_step(step_ids))
        report.cases.append(f"batch {batch}, prompt {length} tokens")
    prompt = rng.integers(3, vocab_size, size=(1, 8))
    options = GenerationOptions(max_new_tokens=steps)
    ones = np.ones_like(prompt)
    reference = generate(eager, prompt, ones, options)[0]
    candidate = generate(onnx, prompt, ones, options)[0]
    same = reference == candidate
    report.greedy = {
        "steps": int(steps),
        "agreement": float(same.mean()),
        "first_divergence": None if same.all() else int(np.argmin(same)),
    }
    return report
