"""The gate of one component (`--encoder`, `--decoder`): ONNX Runtime on the export's device
against the eager module on fresh inputs (encoders: noise and speech-like clips at two batch
sizes and lengths; decoders: prompts, a decode step and greedy tokens), with the bounds of
`bounds.gate_tolerance`, and the report the manifest keeps."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from torch import nn
from tqdm import tqdm

from lalm_export.models.eager import EagerDecoderBackend, eager_encoder_outputs, full_fp32
from lalm_export.models.families import FamilySpec
from lalm_export.parity.bounds import FP32_RELATIVE, GREEDY_STEPS, Tolerance, gate_tolerance
from lalm_export.parity.report import ParityReport
from lalm_export.parity.signals import speech_like
from lalm_export.progress import Stages
from runtime.generation import GenerationOptions, generate
from runtime.ort_backends import decoder_backend
from runtime.sessions import SessionOptions, create_session


@dataclass(frozen=True)
class ComponentGate:
    """What the gate of one component's graph is run with: the export's settings it reads."""

    spec: FamilySpec
    precision: str
    device: str = "cpu"
    seed: int = 0
    all_hidden_states: bool = False
    min_cosine: float | None = None  # --min-cosine
    relative: float = FP32_RELATIVE  # --rtol
    absolute: float | None = None  # --atol

    def tolerance(self) -> Tolerance:
        return gate_tolerance(self.precision, self.spec.role, self.min_cosine, relative=self.relative, absolute=self.absolute)


def check_parity(model: nn.Module, graph: Path, gate: ComponentGate, reference: str, progress: bool) -> ParityReport:
    """The graph on `gate.device` against `model` (already on that device, in its dtype)."""
    session = create_session(graph, SessionOptions(provider=gate.device))
    tolerance = gate.tolerance()
    if gate.spec.role == "decoder":
        report = check_decoder(model, session, tolerance, int(model.config.vocab_size), seed=gate.seed, progress=progress)
    else:
        report = check_encoder(model, session, gate.spec, gate.all_hidden_states, tolerance, seed=gate.seed, progress=progress)
    report.reference = reference
    return report


def verify_graph(model: nn.Module, graph: Path, gate: ComponentGate, stages: Stages) -> dict[str, Any]:
    """Gate on eager fp32; an fp16 graph is also compared with eager fp16 (recorded, not gated)."""
    model = model.to(gate.device)
    with full_fp32():
        report = check_parity(model, graph, gate, f"eager PyTorch fp32 (merged) on {gate.device}", not stages.quiet)
    parity = report.gate(stages.say)
    if gate.precision == "fp16":
        half = copy.deepcopy(model).half()
        against_half = check_parity(half, graph, gate, f"eager PyTorch fp16 on {gate.device}", not stages.quiet)
        stages.say("      against eager fp16: " + "; ".join(against_half.summary_lines()))
        parity["against_eager_fp16"] = against_half.to_dict()
    return parity


def encoder_cases(spec: FamilySpec, seed: int, n_mels: int = 80) -> list[tuple[str, np.ndarray]]:
    """At least two batch sizes and two lengths (Whisper: its fixed 30 s window, of noise and of
    the log-mel of speech-like clips that leave part of it silent), of noise and of speech-like
    audio: quiet stretches between syllables, and a window's silent rest, are where a reduced
    precision loses most (Whisper tiny.en's int8 loses its worst frames there, not on noise)."""
    from runtime.audio import log_mel

    rng = np.random.default_rng(seed)
    if not spec.dynamic_length:
        noise = [(f"noise, batch {b}, 3000 frames", rng.standard_normal((b, n_mels, 3000)).astype(np.float32)) for b in (1, 2)]
        config = {"feature_size": n_mels}
        speech = [
            (f"speech-like log-mel, batch {b}, {seconds:g} s of 30", np.stack([log_mel(speech_like(seconds, seed=seed + i), config) for i in range(b)]))
            for b, seconds in ((1, 8.0), (2, 20.0))
        ]
        return noise + speech
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
