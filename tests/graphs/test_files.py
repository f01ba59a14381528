"""Graph files past protobuf's 2 GB limit: weights saved beside the graph. Measured tensor by
tensor, since a ModelProto past 2 GB cannot be serialized even to measure it (a Qwen2-Audio
tower of Whisper-large's size failed so)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import lalm_export.graphs.files as files


def matmul_graph(rows: int) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4), "weight")
    node = helper.make_node("MatMul", ["x", "weight"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_graph_whose_tensors_pass_the_limit_keeps_them_beside_it(tmp_path, monkeypatch):
    model = matmul_graph(256)  # 4 KB of weights
    monkeypatch.setattr(files, "LARGE_GRAPH_BYTES", 1000)
    assert files.is_large_model(model)
    files.save_graph(model, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx_data").stat().st_size == 256 * 4 * 4
    x = np.ones((1, 256), dtype=np.float32)
    y = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, x @ np.arange(256 * 4, dtype=np.float32).reshape(256, 4))


def test_a_small_graph_is_one_file(tmp_path):
    files.save_graph(matmul_graph(8), tmp_path / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
