"""The skeleton both exports run: load → merge → export → precision → verify → write, one
numbered progress line per stage. The bundle is built in a temporary folder beside `--output`
and moved into place only when complete and verified: a failed or interrupted export leaves
no bundle. A kind of export (`component.py`, `lalm.py`) loads and merges its modules, then
hands `run_export` its graphs, its gate and its manifest; the skeleton owns the order, the
precision transforms and the folder."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lalm_export.export.manifest import Built, int8_record
from lalm_export.export.options import BUNDLE_FILES
from lalm_export.io import atomic_folder
from lalm_export.precision.int4 import Int4Options
from lalm_export.precision.mixed_int8 import Calibration
from lalm_export.precision.specs import TransformJob, apply_precision
from lalm_export.progress import Stages
from runtime.manifest import Manifest

STAGES = ["load", "merge", "export", "precision", "verify", "write"]
FP32_FOLDER = "fp32"  # inside the temporary bundle: the fp32 export the precisions start from


@dataclass(frozen=True)
class GraphPart:
    """One graph of a bundle: its file name, the role its precision suits, and that precision;
    for an int8 encoder, the gate's inputs and bound its int8 graph is made to meet."""

    file: str
    role: str
    precision: str
    calibration: Calibration | None = None


class ExportSteps(Protocol):
    """What a kind of export supplies to the skeleton."""

    parts: tuple[GraphPart, ...]
    exporter: str  # the export stage's progress line: what writes the graphs
    precision_detail: str  # the precision stage's progress line
    verify_detail: str  # the verify stage's progress line

    def export_graphs(self, fp32: Path, bundle: Path) -> list[str]:
        """Write every part's fp32 graph into `fp32` and the companion files into `bundle`;
        returns the names of the graph rewrites applied."""
        ...

    def verify(self, bundle: Path, stages: Stages) -> dict[str, Any]:
        """Gate the bundle's graphs against the eager modules (a `ParityError` when refused);
        returns the manifest's parity record."""
        ...

    def manifest(self, bundle: Path, built: Built) -> Manifest: ...


@dataclass(frozen=True)
class RunSettings:
    """The user's choices the skeleton itself acts on."""

    output: Path
    replace: bool  # an existing bundle (or empty folder) at `output` is replaced
    verify: bool
    target_cpu: str = "auto"
    int4: Int4Options = Int4Options()


def run_export(steps: ExportSteps, settings: RunSettings, stages: Stages) -> Manifest:
    """Export, transform, gate and write the bundle at `settings.output`."""
    with atomic_folder(settings.output, replace=settings.replace) as tmp:
        fp32 = tmp / FP32_FOLDER
        with stages.stage("export", steps.exporter):
            fp32.mkdir()
            optimizations = steps.export_graphs(fp32, tmp)
        reduced = any(part.precision != "fp32" for part in steps.parts)
        if not reduced:
            stages.skip("precision", "fp32")
        with stages.stage("precision", steps.precision_detail) if reduced else nullcontext():
            transforms = {part.file: place_graph(fp32, tmp, part, settings) for part in steps.parts}
            shutil.rmtree(fp32)
        if settings.verify:
            with stages.stage("verify", steps.verify_detail):
                parity = steps.verify(tmp, stages)
        else:
            stages.skip("verify", "--no-verify")
            parity = {"verified": False, "reason": "--no-verify"}
        int8 = next((int8_record(transforms[part.file], settings.verify) for part in steps.parts if part.precision == "int8"), None)
        with stages.stage("write", str(settings.output)):
            manifest = steps.manifest(tmp, Built(parity, transforms, optimizations, int8))
            manifest.write(tmp)
            record_bundle_files(tmp)
    return manifest


def place_graph(source: Path, target: Path, part: GraphPart, settings: RunSettings) -> dict[str, Any]:
    """The part's fp32 graph (and its weights file) moved into the bundle, or its precision's
    transform written there; returns the transform's facts for the manifest."""
    if part.precision == "fp32":
        for file in source.glob(part.file + "*"):
            file.rename(target / file.name)
        return {}
    job = TransformJob(part.role, settings.int4, settings.target_cpu, part.calibration)
    return apply_precision(source / part.file, target / part.file, part.precision, job)


def record_bundle_files(folder: Path) -> None:
    """Write the list of every file in the finished bundle: `--force` later replaces a bundle
    only when it holds nothing else (a user's file put in it is refused, not deleted)."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    (folder / BUNDLE_FILES).write_text(json.dumps([*names, BUNDLE_FILES], indent=1) + "\n", encoding="utf-8")
