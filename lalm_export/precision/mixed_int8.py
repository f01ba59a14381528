"""int8 within the gate's bound: where quantizing every MatMul misses the bound an encoder's
gate holds it to (Whisper tiny.en's real weights: cosine 0.9973, worst frame 0.988 on the gate's
inputs), the int8 graph is remade until it meets the bound, with a margin, on the gate's own
inputs, run by ONNX Runtime:

1. the recipe as it is (most graphs, random weights included, stop here);
2. the same weights with a scale per output channel (Whisper tiny.en: cosine 0.99917, worst
   frame 0.9931: still short);
3. with that, the MatMuls' inputs smoothed (`smoothing.py`: SmoothQuant's per-channel scales
   move the activations' outlier range into the weights; the same function in fp32), and the
   MatMuls whose int8 error hurts the output most kept in fp32, 0, 1, 2, 4, ... of them, then
   the fewest between the last two counts by bisection: each MatMul's harm is measured alone
   (it alone in int8, the rest fp32). Whisper tiny.en: 4 of 24 kept (11 without smoothing).

The search costs a quantization and a run of the calibration inputs per MatMul, so it is made
for graphs up to SEARCH_BYTES of weights; a larger graph keeps step 1 and the gate decides. The
gate judges the bundle as always; the manifest records what was kept in fp32 and why."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lalm_export.graphs.files import graph_bytes, load_graph
from lalm_export.parity.report import cosine_similarities
from lalm_export.precision.smoothing import smooth_matmul_inputs
from lalm_export.precision.transforms import Int8Recipe, quantize_int8

Feeds = list[dict[str, np.ndarray]]
MARGIN = 0.1  # of the distance from the bound to 1: the gate's own run may land a little lower
SEARCH_BYTES = 512 * 2**20  # weights of the largest graph searched (wav2vec2-base: 360 MB; a Whisper-large tower, 2.5 GB, is not)


@dataclass(frozen=True)
class Calibration:
    """What the int8 graph must reach, on what: the gate's inputs and its cosine bound on the
    first output. `frames`: per case (batch 1), the leading frames of that output the gate reads
    (an audio LLM's encoder pads a clip to its window and the gate cuts the padding); None: all."""

    feeds: Callable[[], Feeds]
    cosine: float
    row_cosine: float
    frames: Callable[[], Sequence[int]] | None = None

    def measure(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> tuple[float, float]:
        """The lowest cosine and the lowest per-row cosine over the cases."""
        if self.frames is not None:
            counts = self.frames()
            reference = [r[:, :n] for r, n in zip(reference, counts)]
            candidate = [c[:, :n] for c, n in zip(candidate, counts)]
        pairs = [cosine_similarities(r, c) for r, c in zip(reference, candidate)]
        return min(p[0] for p in pairs), min(p[1] for p in pairs)

    def reached(self, figures: tuple[float, float]) -> bool:
        return figures[0] >= with_margin(self.cosine) and figures[1] >= with_margin(self.row_cosine)


def with_margin(bound: float) -> float:
    return 1 - (1 - MARGIN) * (1 - bound)


def quantize_int8_within(source: Path, target: Path, recipe: Int8Recipe, calibration: Calibration | None) -> dict[str, Any]:
    """Write the int8 graph of `source` to `target`, made to meet the calibration's bound as the
    module's steps say; returns the recipe used and what the manifest records of the choice."""
    quantize_int8(source, target, recipe)
    if calibration is None:
        return recipe.to_dict()
    feeds = calibration.feeds()
    reference = first_outputs(source, feeds)
    figures = calibration.measure(reference, first_outputs(target, feeds))
    if calibration.reached(figures) or graph_bytes(source) > SEARCH_BYTES:
        return {**recipe.to_dict(), **record([], 0, figures)}
    if not recipe.per_channel:
        recipe = dataclasses.replace(recipe, per_channel=True)
        quantize_int8(source, target, recipe)
        figures = calibration.measure(reference, first_outputs(target, feeds))
        if calibration.reached(figures):
            return {**recipe.to_dict(), **record([], 0, figures)}
    with tempfile.TemporaryDirectory(prefix="smoothed-") as folder:
        smoothed = Path(folder) / source.name
        facts = {"smoothed_inputs": smooth_matmul_inputs(source, smoothed, feeds)}
        return {**recipe.to_dict(), **facts, **fewest_fp32(smoothed, target, recipe, feeds, reference, calibration)}


def fewest_fp32(source: Path, target: Path, recipe: Int8Recipe, feeds: Feeds, reference: list[np.ndarray], calibration: Calibration) -> dict[str, Any]:
    """Write to `target` the int8 graph of `source` with the fewest MatMuls kept in fp32 that
    meets the calibration's bound (none, where all in int8 meets it); returns its record."""
    quantize_int8(source, target, recipe)
    figures = calibration.measure(reference, first_outputs(target, feeds))
    if calibration.reached(figures):
        return record([], 0, figures)
    order = most_harmful_first(source, target, recipe, feeds, reference, calibration)

    def attempt(count: int) -> tuple[float, float]:
        quantize_int8(source, target, recipe, exclude=order[:count])
        return calibration.measure(reference, first_outputs(target, feeds))

    # Double the count kept in fp32 until the bound is met, then bisect down to the fewest.
    low, high = 0, 1
    figures = attempt(high)
    while not calibration.reached(figures) and high < len(order):
        low, high = high, min(2 * high, len(order))
        figures = attempt(high)
    best, last = figures, high
    while high - low > 1:
        middle = last = (low + high) // 2
        figures = attempt(middle)
        if calibration.reached(figures):
            high, best = middle, figures
        else:
            low = middle
    if last != high:  # `target` holds the last graph tried: write the chosen one again
        attempt(high)
    return record(order[:high], len(order), best)


def record(kept: list[str], of: int, figures: tuple[float, float]) -> dict[str, Any]:
    facts: dict[str, Any] = {"kept_fp32": kept, "calibration": {"cosine": round(figures[0], 6), "row_cosine": round(figures[1], 6)}}
    if kept:
        facts["kept_fp32_why"] = f"the {len(kept)} of {of} MatMuls whose int8 error alone hurt the gate's inputs most, as few as meet its bound"
    return facts


def most_harmful_first(source: Path, scratch: Path, recipe: Int8Recipe, feeds: Feeds, reference: list[np.ndarray], calibration: Calibration) -> list[str]:
    """The MatMuls with constant weights, by the harm of each alone in int8 (the rest fp32) to
    the output's cosine and worst-row cosine, most harmful first."""
    model = load_graph(source)
    weights = {t.name for t in model.graph.initializer}
    names = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    harm = {}
    for name in names:
        quantize_int8(source, scratch, recipe, exclude=[other for other in names if other != name])
        whole, rows = calibration.measure(reference, first_outputs(scratch, feeds))
        harm[name] = (1 - whole) + (1 - rows)
    return sorted(names, key=lambda name: -harm[name])


def first_outputs(graph: Path, feeds: Feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    name = session.get_outputs()[0].name
    wanted = {i.name for i in session.get_inputs()}
    return [session.run([name], {k: v for k, v in feed.items() if k in wanted})[0] for feed in feeds]
