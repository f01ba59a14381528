"""The op-by-op graphs `torch.onnx` writes keep Optimum's layout, which the runtime and older
bundles share: names, which axes are dynamic, one graph for the prefill and the decode steps."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import AutoModelForCausalLM

from lalm_export.graphs.traced import decoder_cache_shape, export_decoder, export_encoder
from lalm_export.models.families import get_family
from lalm_export.models.loading import load_family_model
from tests.graphs.test_fused import tiny_decoder_config


def dims(value: onnx.ValueInfoProto) -> list[object]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_a_decoder_graph_has_optimums_names_and_runs_the_prefill_and_a_step(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_decoder_config("qwen2", tied=True)).eval()
    graph = onnx.load(str(export_decoder(model, tmp_path / "model.onnx", opset=18)))
    inputs, outputs = {v.name: dims(v) for v in graph.graph.input}, {v.name: dims(v) for v in graph.graph.output}
    layers, (heads, head_dim) = model.config.num_hidden_layers, decoder_cache_shape(model.config)
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["past_key_values.0.key"] == ["batch_size", heads, "past_sequence_length", head_dim]
    assert outputs["logits"] == ["batch_size", "sequence_length", model.config.vocab_size]
    assert {f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")} <= set(outputs)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 6, 7, 8]])
    empty = {f"past_key_values.{i}.{kv}": np.zeros((1, heads, 0, head_dim), np.float32) for i in range(layers) for kv in ("key", "value")}
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None], **empty}
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_an_encoder_graph_names_every_layer_when_asked(checkpoints, tmp_path):
    spec = get_family("wav2vec2")
    model = load_family_model(spec, str(checkpoints["wav2vec2"]), None, False).eval()
    graph = onnx.load(str(export_encoder(model, spec, True, tmp_path / "model.onnx", opset=18)))
    layers = model.config.num_hidden_layers
    assert [v.name for v in graph.graph.input] == ["input_values"] and dims(graph.graph.input[0]) == ["batch_size", "sequence_length"]
    assert [v.name for v in graph.graph.output] == ["last_hidden_state", *(f"hidden_states.{i}" for i in range(layers + 1))]
