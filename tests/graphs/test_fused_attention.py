"""`fuse_attention`: an exported encoder's unmasked self-attention becomes ONNX Runtime's
MultiHeadAttention, with the same outputs; attention with a mask is left alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lalm_export.cli import main as export_main
from lalm_export.graphs.rewrites import FUSED_ATTENTION, fuse_attention
from tests.helpers import run_main

FRAMES, WIDTH, HEADS = 40, 32, 4


def attention_graph(masked: bool = False, heads_written: bool = True, cross: bool = False) -> onnx.ModelProto:
    """Projections q, k, v (1, FRAMES, WIDTH) of the input `x` split into heads as torch.onnx
    writes it (k transposed for q k^T, a scale Mul on q and on k), Softmax, back to (1, FRAMES,
    WIDTH). `masked`: a mask added to the scores first; without `heads_written` the splits say
    -1 heads, as wav2vec2's do; `cross`: q projects another input, `m`."""
    split = numpy_helper.from_array(np.array([1, FRAMES, HEADS if heads_written else -1, WIDTH // HEADS], dtype=np.int64), "split")
    merge = numpy_helper.from_array(np.array([1, FRAMES, WIDTH], dtype=np.int64), "merge")
    scale = numpy_helper.from_array(np.array((WIDTH // HEADS) ** -0.25, dtype=np.float32), "scale")
    mask = numpy_helper.from_array(np.triu(np.full((FRAMES, FRAMES), -1e4, dtype=np.float32), 1), "mask")
    nodes = [
        helper.make_node("Reshape", ["q", "split"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["qt", "scale"], ["qs"]),
        helper.make_node("Reshape", ["k", "split"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["kt", "scale"], ["ks"]),
        helper.make_node("Reshape", ["v", "split"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
        *([helper.make_node("Add", ["scores", "mask"], ["masked"])] if masked else []),
        helper.make_node("Softmax", ["masked" if masked else "scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vt"], ["context"]),
        helper.make_node("Transpose", ["context"], ["ct"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ct", "merge"], ["y"]),
    ]
    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / WIDTH**0.5, "w" + name) for name in "qkv"]
    sources = {"q": "m" if cross else "x", "k": "x", "v": "x"}
    nodes[:0] = [helper.make_node("MatMul", [sources[name], "w" + name], [name]) for name in "qkv"]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, FRAMES, WIDTH]) for name in sorted(set(sources.values()))]
    initializers = [split, merge, scale, mask, *weights]
    output = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, FRAMES, WIDTH])]
    graph = helper.make_graph(nodes, "attention", inputs, output, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def fused_and_unfused(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """How many attentions `fuse_attention` fused, and the outputs before and after."""
    before = run(model, feeds)
    return fuse_attention(model), before, run(model, feeds)


def inputs(*names: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((1, FRAMES, WIDTH)).astype(np.float32) for name in names}


@pytest.mark.parametrize("heads_written", [True, False], ids=["heads written", "heads written as -1 (wav2vec2)"])
def test_unmasked_self_attention_becomes_one_node_with_the_same_outputs(heads_written):
    model = attention_graph(heads_written=heads_written)
    fused, before, after = fused_and_unfused(model, inputs("x"))
    assert fused == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul"] * 3 + ["MultiHeadAttention"]  # the head splits, scores and merge are gone
    attention = model.graph.node[-1]
    assert {a.name: helper.get_attribute_value(a) for a in attention.attribute}["num_heads"] == HEADS
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("graph", "feeds"), [(dict(masked=True), "x"), (dict(cross=True), "mx")], ids=["masked", "cross-attention"])
def test_masked_attention_and_cross_attention_are_left_alone(graph, feeds):
    model = attention_graph(**graph)
    before = [n.op_type for n in model.graph.node]
    assert fuse_attention(model) == 0
    assert [n.op_type for n in model.graph.node] == before


@pytest.mark.parametrize(("family", "layers_key"), [("whisper", "encoder_layers"), ("wav2vec2", "num_hidden_layers")])
def test_an_encoder_bundle_has_fused_attention_and_passes_the_gate(family, layers_key, checkpoints, tmp_path, capsys):
    result = run_main(export_main, "--encoder", family, "--model", checkpoints[family], "--output", tmp_path / "b", "--json", capsys=capsys)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert FUSED_ATTENTION in manifest["optimizations"] and manifest["parity"]["passed"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.node]
    layers = json.loads((tmp_path / "b" / "config.json").read_text())[layers_key]
    assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops
