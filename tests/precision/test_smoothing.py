"""Activation smoothing before dynamic int8 (lalm_export/precision/smoothing.py): the same
function in fp32, and int8 that loses less where one input channel carries outliers."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lalm_export.precision.smoothing import smooth_matmul_inputs
from lalm_export.precision.transforms import int8_recipe, quantize_int8


def outlier_graph(path, rng):
    """x (1, 64, 32) -> x W1 and x W2 (two MatMuls reading one tensor) -> relu(x W1) W3 + x W2."""
    weights = {name: rng.standard_normal(shape).astype(np.float32) * 0.2 for name, shape in (("w1", (32, 48)), ("w2", (32, 16)), ("w3", (48, 16)))}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
        helper.make_node("MatMul", ["x", "w2"], ["skip"], name="second"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w3"], ["z"], name="third"),
        helper.make_node("Add", ["z", "skip"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "outliers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 16])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_smoothing_keeps_the_function_and_int8_loses_less_on_outlier_channels(tmp_path):
    rng = np.random.default_rng(0)
    outlier_graph(tmp_path / "g.onnx", rng)
    x = rng.standard_normal((1, 64, 32)).astype(np.float32)
    x[..., 3] *= 60  # one channel far larger than the others, as transformer activations have
    feeds = [{"x": x}]
    smoothed = smooth_matmul_inputs(tmp_path / "g.onnx", tmp_path / "s.onnx", feeds)
    assert smoothed == 2  # x (read by two MatMuls, one scale) and relu's output
    mul = [n for n in onnx.load(str(tmp_path / "s.onnx")).graph.node if n.op_type == "Mul"]
    assert len(mul) == 2
    reference = run(tmp_path / "g.onnx", x)
    np.testing.assert_allclose(run(tmp_path / "s.onnx", x), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    recipe = dataclasses.replace(int8_recipe("auto"), per_channel=True)  # this CPU's kernels, as the exporter's search uses
    quantize_int8(tmp_path / "g.onnx", tmp_path / "g8.onnx", recipe)
    quantize_int8(tmp_path / "s.onnx", tmp_path / "s8.onnx", recipe)
    plain, smooth = (np.abs(run(tmp_path / name, x) - reference).max() for name in ("g8.onnx", "s8.onnx"))
    assert smooth < 0.7 * plain, (smooth, plain)


def test_a_channel_quiet_on_the_calibration_inputs_is_not_magnified_where_other_inputs_drive_it(tmp_path):
    """Fitted where channel 5 is near silent, the smoothed graph meets inputs that drive it (real
    speech after synthetic calibration clips): its int8 error stays below plain int8's, not
    blown up by a channel scaled by its own tiny range."""
    rng = np.random.default_rng(1)
    outlier_graph(tmp_path / "g.onnx", rng)
    calibration = rng.standard_normal((1, 64, 32)).astype(np.float32)
    calibration[..., 3] *= 60
    calibration[..., 5] *= 1e-3
    smooth_matmul_inputs(tmp_path / "g.onnx", tmp_path / "s.onnx", [{"x": calibration}])
    other = rng.standard_normal((1, 64, 32)).astype(np.float32)
    other[..., 3] *= 60
    other[..., 5] *= 3
    reference = run(tmp_path / "g.onnx", other)
    recipe = dataclasses.replace(int8_recipe("auto"), per_channel=True)
    quantize_int8(tmp_path / "g.onnx", tmp_path / "g8.onnx", recipe)
    quantize_int8(tmp_path / "s.onnx", tmp_path / "s8.onnx", recipe)
    plain, smooth = (np.abs(run(tmp_path / name, other) - reference).max() for name in ("g8.onnx", "s8.onnx"))
    assert smooth < plain, (smooth, plain)
