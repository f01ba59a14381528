"""Fused decoder graphs (ONNX Runtime's model builder): the graph is the fused form, each
supported architecture passes the parity gate, ragged batches generate what each prompt
generates alone, and the choice between fused and Optimum graphs says why."""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import lalm_export.graphs.fused as fused
from lalm_export.cli import main
from lalm_export.demo.tiny import save_random_checkpoint
from lalm_export.errors import OptionsError
from lalm_export.export.component import ExportOptions, export_bundle
from lalm_export.models.families import TINY_HIDDEN, get_family
from runtime.api import load
from runtime.errors import RuntimeUserError
from runtime.generation import GenerationOptions
from runtime.manifest import read_manifest
from runtime.ort_backends import LEFT_PADDING_METADATA, OrtDecoderBackend, RowByRowBackend
from tests.helpers import assert_user_error, run_main


def graph_of(bundle) -> onnx.ModelProto:
    return onnx.load(str(bundle / read_manifest(bundle).graphs["model"].path), load_external_data=False)


def test_fused_graph_replaces_the_shape_arithmetic_with_fused_attention(checkpoints, tmp_path):
    model = str(checkpoints["llm"])
    manifest = export_bundle(ExportOptions(family="llm", model=model, output=tmp_path / "fused"), quiet=True)
    export_bundle(ExportOptions(family="llm", model=model, output=tmp_path / "optimum", decoder_graph="optimum"), quiet=True)
    proto, optimum = graph_of(tmp_path / "fused"), graph_of(tmp_path / "optimum")
    ops = Counter(node.op_type for node in proto.graph.node)
    layers = manifest.extra["num_hidden_layers"]
    assert ops["GroupQueryAttention"] == layers and ops["SkipSimplifiedLayerNormalization"] >= layers
    assert len(proto.graph.node) * 3 < len(optimum.graph.node), (len(proto.graph.node), len(optimum.graph.node))
    assert "position_ids" not in {i.name for i in proto.graph.input}
    assert {p.key: p.value for p in proto.metadata_props}[LEFT_PADDING_METADATA] == "false"
    assert manifest.opset == next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert manifest.parity["passed"] and manifest.parity["outputs"]["logits (prefill)"]["relative"] < 1e-5


def tiny_decoder_config(architecture: str, tied: bool = False):
    """The registry's tiny decoder sizes in another architecture's config class."""
    config_class = {"mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "gemma": "GemmaConfig"}[architecture]
    extra = {"head_dim": TINY_HIDDEN // 4} if architecture in ("qwen3", "gemma") else {}
    return dataclasses.replace(get_family("llm").tiny, config_class=config_class).build(tie_word_embeddings=tied, **extra)


@pytest.mark.parametrize("architecture, tied", [("mistral", False), ("qwen2", False), ("qwen2", True), ("qwen3", False)])
def test_each_fused_architecture_passes_the_parity_gate(architecture, tied, tmp_path):
    checkpoint = save_random_checkpoint("llm", tmp_path / "ckpt", tiny_decoder_config(architecture, tied), seed=3)
    manifest = export_bundle(ExportOptions(family="llm", model=str(checkpoint), output=tmp_path / "bundle"), quiet=True)
    assert manifest.extra["decoder_graph"] == "fused" and manifest.model_type == architecture
    assert manifest.parity["passed"] and manifest.parity["greedy"]["agreement"] == 1.0
    int4 = export_bundle(ExportOptions(family="llm", model=str(checkpoint), output=tmp_path / "int4", precision="int4"), quiet=True)
    assert int4.parity["passed"], "the (tied) lm_head quantizes in the fused graph too"
    assert {p.key: p.value for p in graph_of(tmp_path / "int4").metadata_props}[LEFT_PADDING_METADATA] == "false"


def test_a_ragged_batch_generates_what_each_prompt_generates_alone(checkpoints, tmp_path):
    export_bundle(ExportOptions(family="llm", model=str(checkpoints["llm"]), output=tmp_path / "b"), quiet=True)
    generator = load(tmp_path / "b")
    prompts = ["the quick brown fox jumps over the lazy dog", "hi"]
    options = GenerationOptions(max_new_tokens=8)
    together = [c.tokens for c in generator.complete(prompts, options)]
    alone = [generator.complete([p], options)[0].tokens for p in prompts]
    assert together == alone
    # Why the runtime splits the batch: fed left padding, the graph's positions are wrong.
    ids, mask = generator.encode_prompts(prompts)
    assert (mask == 0).any()
    padded = OrtDecoderBackend(generator.session).prefill(ids, mask)
    rows = RowByRowBackend(lambda: OrtDecoderBackend(generator.session)).prefill(ids, mask)
    np.testing.assert_allclose(padded[0], rows[0], rtol=1e-5, atol=1e-6)
    assert np.abs(padded[1] - rows[1]).max() > 1e-3


def test_row_by_row_refuses_padding_that_is_not_left_padding(checkpoints, tmp_path):
    export_bundle(ExportOptions(family="llm", model=str(checkpoints["llm"]), output=tmp_path / "b"), quiet=True)
    session = load(tmp_path / "b").session
    backend = RowByRowBackend(lambda: OrtDecoderBackend(session))
    ids = np.array([[5, 6, 7], [5, 6, 7]])
    with pytest.raises(RuntimeUserError, match="left padding only"):
        backend.prefill(ids, np.array([[1, 1, 1], [1, 1, 0]]))


def fake_model(architecture: str, rope_scaling=None) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(architectures=[architecture], rope_scaling=rope_scaling))


def test_the_graph_choice_follows_the_flags_and_says_why(monkeypatch):
    llama = fake_model("LlamaForCausalLM")
    assert fused.choose_decoder_graph("auto", llama, optimize=True, device="cpu")[0] == "fused"
    plain_rotary = fake_model("LlamaForCausalLM", {"rope_type": "default", "rope_theta": 10000.0})  # how transformers 5 writes no scaling
    assert fused.choose_decoder_graph("auto", plain_rotary, optimize=True, device="cpu")[0] == "fused"
    assert fused.choose_decoder_graph("auto", llama, optimize=False, device="cpu") == ("optimum", "--no-optimize")
    assert fused.choose_decoder_graph("auto", llama, optimize=True, device="cuda")[0] == "optimum"
    assert fused.choose_decoder_graph("auto", llama, optimize=True, device="cpu", opset=17) == ("optimum", "--opset 17")
    kind, why = fused.choose_decoder_graph("auto", fake_model("GPT2LMHeadModel"), optimize=True, device="cpu")
    assert kind == "optimum" and "GPT2LMHeadModel is not one of" in why
    with pytest.raises(OptionsError, match="CPU provider"):
        fused.choose_decoder_graph("fused", llama, optimize=True, device="cuda")
    with pytest.raises(OptionsError, match="drop --opset"):
        fused.choose_decoder_graph("fused", llama, optimize=True, device="cpu", opset=17)
    with pytest.raises(OptionsError, match="rope_scaling.*use --decoder-graph optimum"):
        fused.choose_decoder_graph("fused", fake_model("LlamaForCausalLM", {"rope_type": "linear", "factor": 2.0}), optimize=True, device="cpu")
    monkeypatch.setattr(fused, "builder_available", lambda: False)
    kind, why = fused.choose_decoder_graph("auto", llama, optimize=True, device="cpu")
    assert kind == "optimum" and "pip install 'onnxruntime-genai" in why


def test_the_builder_runs_no_checkpoint_code_unless_asked(checkpoints, tmp_path, monkeypatch):
    import onnxruntime_genai.models.builder as builder

    calls = []
    real = builder.create_model

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(builder, "create_model", spy)
    export_bundle(ExportOptions(family="llm", model=str(checkpoints["llm"]), output=tmp_path / "b", verify=False), quiet=True)
    assert calls and calls[0]["hf_remote"] is False and calls[0]["hf_token"] is None  # no checkpoint code, no hub token
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix in (".onnx", ".data")) == ["model.onnx", "model.onnx.data"]


def test_decoder_graph_flag_errors_are_one_line(checkpoints, tmp_path, capsys):
    result = run_main(main, "--encoder", "hubert", "--model", checkpoints["hubert"], "--decoder-graph", "fused", "--output", tmp_path / "o", capsys=capsys)
    assert_user_error(result, "--decoder-graph is for decoders")
    result = run_main(
        main, "--decoder", "auto", "--model", checkpoints["llm"], "--decoder-graph", "fused", "--opset", "17", "--output", tmp_path / "o", capsys=capsys
    )
    assert_user_error(result, "drop --opset")
    assert not (tmp_path / "o").exists()
