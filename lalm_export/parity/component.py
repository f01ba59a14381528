"""Running the parity gate of an export: the tolerance its precision calls for, ONNX
Runtime on the export's device against the eager module, and the report the manifest keeps."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from lalm_export.export.options import ExportOptions
from lalm_export.models.eager import full_fp32
from lalm_export.parity.report import ParityReport, Tolerance, check_decoder, check_encoder
from lalm_export.precision.specs import SPECS
from lalm_export.progress import Stages
from runtime.sessions import SessionOptions, create_session


def parity_tolerance(opts: ExportOptions) -> Tolerance:
    """fp32: relative error (`--rtol`, `--atol`); a reduced precision: its row's cosine bound
    (or `--min-cosine`), with greedy agreement recorded, not gated."""
    bound = SPECS[opts.precision].cosine_bound(opts.spec.role, opts.min_cosine)
    if bound is None:
        return Tolerance(relative=opts.rtol, absolute=opts.atol)
    return Tolerance(relative=opts.rtol, absolute=opts.atol, cosine=bound.cosine, row_cosine=bound.row_cosine, greedy_agreement=None)


def check_parity(model: nn.Module, graph: Path, opts: ExportOptions, tolerance: Tolerance, reference: str, progress: bool) -> ParityReport:
    """The graph on `opts.device` against `model` (already on that device, in its dtype)."""
    session = create_session(graph, SessionOptions(provider=opts.device))
    if opts.spec.role == "decoder":
        report = check_decoder(model, session, tolerance, int(model.config.vocab_size), seed=opts.seed, progress=progress)
    else:
        report = check_encoder(model, session, opts.spec, opts.all_hidden_states, tolerance, seed=opts.seed, progress=progress)
    report.reference = reference
    return report


def verify_graph(model: nn.Module, graph: Path, opts: ExportOptions, stages: Stages) -> dict[str, Any]:
    """Gate on eager fp32; an fp16 graph is also compared with eager fp16 (recorded, not gated)."""
    model = model.to(opts.device)
    with full_fp32():
        report = check_parity(model, graph, opts, parity_tolerance(opts), f"eager PyTorch fp32 (merged) on {opts.device}", not stages.quiet)
    for line in report.summary_lines():
        stages.say(f"      {line}")
    report.raise_if_failed()
    parity = report.to_dict()
    if opts.precision == "fp16":
        half = copy.deepcopy(model).half()
        against_half = check_parity(half, graph, opts, parity_tolerance(opts), f"eager PyTorch fp16 on {opts.device}", not stages.quiet)
        stages.say("      against eager fp16: " + "; ".join(against_half.summary_lines()))
        parity["against_eager_fp16"] = against_half.to_dict()
    return parity
