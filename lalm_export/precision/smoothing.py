"""Activation smoothing (SmoothQuant, Xiao et al. 2023) for dynamic int8 MatMuls.

Dynamic int8 gives a MatMul's whole activation tensor one scale, so a few input channels with
large values (Whisper's have them) leave the others a handful of levels. For `y = x W`, a scale
`s` per input channel moves that range into the weights, which have a scale per output channel
and room to spare: `y = (x / s) (s W)`, the same product in exact arithmetic. Here `x / s` is a
Mul node inserted before the MatMuls that read `x` (one per activation tensor, shared by the
MatMuls that read it, as the query, key and value projections do) and `s W` replaces the weights:
`s = max|x|^alpha / max|W|^(1 - alpha)` per channel, `max|x|` measured on calibration inputs by
ONNX Runtime, `max|W|` over every weight that reads `x`.

Only the loud channels are scaled down: a channel quieter on the calibration inputs than the
tensor's `QUIET_FLOOR` percentile counts as that loud. Scaled by its own small range, a channel
quiet on the calibration inputs is magnified, and where other audio drives it (real speech after
synthetic calibration clips) it takes over the tensor's one int8 scale: Whisper tiny.en's
encoder fitted on the gate's speech-like clips kept cosine 0.9994 on them but fell to 0.73 on
held-out speech; with the floor, 0.9993 (`benchmarks real-lalm`, docs/performance-notes.md)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lalm_export.graphs.files import load_graph, save_graph

# The share of the activations' range moved into the weights. The paper's default, 0.5, left 7 of
# Whisper tiny.en's 24 MatMuls to keep in fp32 for its gate; 0.8, 4 (`benchmarks real-whisper`).
ALPHA = 0.8
# Channel ranges below this percentile of their tensor's are raised to it (the module's docstring).
# Whisper tiny.en's encoder, fitted on speech-like clips, on held-out speech: cosine 0.876 at the
# median, 0.9990 at the 75th, 0.9993 at the 90th, 0.9994 at the 99th; fitted on speech, 0.9995.
QUIET_FLOOR = 90
SCALE_SUFFIX = "/smoothing_scale"


def smooth_matmul_inputs(source: Path, target: Path, feeds: list[dict[str, np.ndarray]], alpha: float = ALPHA) -> int:
    """Write `source` with its constant-weight MatMuls' inputs smoothed to `target` (an fp32
    graph computing the same function); returns how many activation tensors were smoothed."""
    model = load_graph(source)
    weights = {t.name: t for t in model.graph.initializer}
    uses = defaultdict(int)
    for node in model.graph.node:
        for name in node.input:
            uses[name] += 1
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:  # a weight read by another node too keeps its values
        if node.op_type == "MatMul" and uses[node.input[1]] == 1 and node.input[1] in weights and len(weights[node.input[1]].dims) == 2:
            readers[node.input[0]].append(node)
    ranges = {name: floored(r) for name, r in activation_ranges(source, model, list(readers), feeds).items()}
    new_nodes: dict[str, onnx.NodeProto] = {}
    for name, nodes in readers.items():
        matrices = {node.input[1]: numpy_helper.to_array(weights[node.input[1]]) for node in nodes}
        weight_range = np.max(np.abs(np.concatenate(list(matrices.values()), axis=1)), axis=1)
        scale = (np.maximum(ranges[name], 1e-5) ** alpha / np.maximum(weight_range, 1e-5) ** (1 - alpha)).astype(np.float32)
        for weight, matrix in matrices.items():
            weights[weight].CopyFrom(numpy_helper.from_array((matrix * scale[:, None]).astype(matrix.dtype), weight))
        inverse = name + SCALE_SUFFIX
        model.graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), inverse))
        smoothed = name + "/smoothed"
        new_nodes[name] = helper.make_node("Mul", [name, inverse], [smoothed], name=name + "/smoothing")
        for node in nodes:
            node.input[0] = smoothed
    ordered = []
    for node in model.graph.node:  # each Mul right before the first MatMul that reads it: the graph stays sorted
        if node.op_type == "MatMul" and node.input[0].endswith("/smoothed"):
            source_name = node.input[0].removesuffix("/smoothed")
            if source_name in new_nodes:
                ordered.append(new_nodes.pop(source_name))
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    save_graph(model, target)
    return len(readers)


def floored(channel_ranges: np.ndarray) -> np.ndarray:
    """`channel_ranges` with those below the tensor's `QUIET_FLOOR` percentile raised to it."""
    return np.maximum(channel_ranges, np.percentile(channel_ranges, QUIET_FLOOR))


def activation_ranges(source: Path, model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The largest |value| of each last-axis channel of the tensors `names`, over `feeds`."""
    import tempfile

    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    probe.graph.output.extend([helper.make_empty_tensor_value_info(n) for n in names if n not in declared])
    with tempfile.TemporaryDirectory(prefix="smoothing-") as folder:
        path = Path(folder) / source.name
        save_graph(probe, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        ranges: dict[str, np.ndarray] = {}
        for feed in feeds:
            values = session.run(names, {k: v for k, v in feed.items() if k in wanted})
            for name, value in zip(names, values):
                channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                ranges[name] = np.maximum(ranges[name], channel_max) if name in ranges else channel_max
    return ranges
