"""`--precision` and `--optimize`: each reduced-precision bundle is the graph it claims to be
(int8 S8S8 MatMuls, int4 MatMulNBits with the lm_head, fp16 weights with fp32 I/O), passes
its cosine gate against eager fp32, and runs in the runtime; refused combinations say why."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from lalm_export.cli import main
from lalm_export.export.component import ExportOptions, export_bundle
from lalm_export.graphs.rewrites import fold_constant_transposes, keep_last_position_logits
from lalm_export.parity.report import OutputError, Tolerance
from runtime.api import load
from runtime.cpu import int8_kernels
from runtime.generation import GenerationOptions
from runtime.manifest import read_manifest
from runtime.ort_backends import OrtDecoderBackend, decoder_backend
from tests.helpers import assert_user_error, run_main


def graph_ops(bundle) -> Counter:
    manifest = read_manifest(bundle)
    proto = onnx.load(str(bundle / manifest.graphs["model"].path), load_external_data=False)
    return Counter(node.op_type for node in proto.graph.node)


def graph_proto(bundle) -> onnx.ModelProto:
    return onnx.load(str(bundle / read_manifest(bundle).graphs["model"].path))


def test_int8_encoder_quantizes_the_linear_layers_with_signed_weights(encoder_family, checkpoints, tmp_path):
    bundle = tmp_path / "int8"
    manifest = export_bundle(ExportOptions(family=encoder_family, model=str(checkpoints[encoder_family]), output=bundle, precision="int8"), quiet=True)
    ops = graph_ops(bundle)
    assert manifest.precision == "int8" and manifest.dtype == "int8"
    assert manifest.parity["passed"] and manifest.parity["tolerance"]["cosine"] == 0.999
    assert ops["DynamicQuantizeLinear"] > 0 and ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] > 0
    assert ops["ConvInteger"] == 0, "int8 convolutions are slower than fp32 ones in ONNX Runtime"
    constant_matmuls = [
        n for n in graph_proto(bundle).graph.node if n.op_type == "MatMul" and n.input[1] in {t.name for t in graph_proto(bundle).graph.initializer}
    ]
    assert not constant_matmuls, "every MatMul with a weight is quantized"
    signed = [t for t in graph_proto(bundle).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert signed, "S8S8: the weights must be signed int8"
    outputs = load(bundle).encode_arrays([np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.1])
    assert np.isfinite(outputs[0].hidden_states).all()


def last_position_logits(bundle, ids: np.ndarray) -> np.ndarray:
    """The graph's logits output for one unpadded prompt, fed directly (no generation loop)."""
    session = load(bundle).session
    backend = OrtDecoderBackend(session)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    for past in backend.past_names:
        heads, _, dim = backend.kv_shape
        feeds[past] = np.zeros((1, heads, 0, dim), dtype=np.float32)
    return session.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[0]


def test_decoder_graphs_return_last_position_logits_only(checkpoints, tmp_path):
    model = str(checkpoints["llm"])
    fused = export_bundle(ExportOptions(family="llm", model=model, output=tmp_path / "fused"), quiet=True)
    optimum = export_bundle(ExportOptions(family="llm", model=model, output=tmp_path / "optimum", decoder_graph="optimum"), quiet=True)
    plain = export_bundle(ExportOptions(family="llm", model=model, output=tmp_path / "plain", optimize=False), quiet=True)
    assert "logits for the last position only" in fused.optimizations and fused.extra["decoder_graph"] == "fused"
    assert optimum.optimizations == ["logits for the last position only"] and optimum.extra["decoder_graph"] == "optimum"
    assert plain.optimizations == [] and plain.extra["decoder_graph"] == "optimum"
    ids = np.array([[5, 6, 7, 8, 9]], dtype=np.int64)
    logits = {name: last_position_logits(tmp_path / name, ids) for name in ("fused", "optimum", "plain")}
    assert logits["fused"].shape[1] == 1 and logits["optimum"].shape[1] == 1 and logits["plain"].shape[1] == 5
    for name in ("fused", "optimum"):
        np.testing.assert_allclose(logits[name][:, -1], logits["plain"][:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder_graph", ["fused", "optimum"])
def test_int4_decoder_quantizes_every_matmul_the_lm_head_in_8_bits(decoder_graph, checkpoints, tmp_path):
    bundle = tmp_path / "int4"
    options = ExportOptions(family="llm", model=str(checkpoints["llm"]), output=bundle, precision="int4", decoder_graph=decoder_graph)
    manifest = export_bundle(options, quiet=True)
    proto = graph_proto(bundle)
    initializers = {t.name for t in proto.graph.initializer}
    ops = Counter(node.op_type for node in proto.graph.node)
    constant_matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    assert ops["MatMulNBits"] > 0 and not constant_matmuls
    lm_head = next(n for n in proto.graph.node if "logits" in n.output)
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in proto.graph.node if n.op_type == "MatMulNBits"}
    assert lm_head.op_type == "MatMulNBits" and bits.pop(lm_head.name) == 8, lm_head
    assert set(bits.values()) == {4}
    assert manifest.extra["int4"] == {"method": "rtn", "block_size": 32, "lm_head": "int8"}
    assert manifest.precision == "int4" and manifest.parity["passed"]
    assert manifest.parity["greedy"]["steps"] > 0 and manifest.parity["tolerance"]["greedy_agreement"] is None
    completion = load(bundle).complete(["hello"], GenerationOptions(max_new_tokens=4))[0]
    assert len(completion.tokens) == 4


def test_fp16_graph_has_half_weights_and_float_io(checkpoints, tmp_path):
    bundle = tmp_path / "fp16"
    manifest = export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=bundle, precision="fp16"), quiet=True)
    proto = graph_proto(bundle)
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*proto.graph.input, *proto.graph.output])
    assert manifest.parity["passed"] and manifest.parity["against_eager_fp16"]["outputs"]["last_hidden_state"]["cosine"] > 0.999
    # the norms' reductions stay float32: every LayerNormalization is fed by a Cast to float
    producers = {o: n for n in proto.graph.node for o in n.output}
    norms = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(producers[n.input[0]].op_type == "Cast" for n in norms)


def test_fp16_decoder_keeps_a_half_kv_cache_and_float_logits(checkpoints, tmp_path):
    bundle = tmp_path / "fp16"
    manifest = export_bundle(ExportOptions(family="llm", model=str(checkpoints["llm"]), output=bundle, precision="fp16"), quiet=True)
    kinds = {t.name: t.dtype for t in manifest.graphs["model"].inputs + manifest.graphs["model"].outputs}
    assert kinds["logits"] == "float32" and kinds["past_key_values.0.key"] == "float16" and kinds["present.0.value"] == "float16"
    generator = load(bundle)
    for binding in (None, "cpu"):
        generator.backend = decoder_backend(generator.session, binding)
        assert len(generator.complete(["hi"], GenerationOptions(max_new_tokens=3))[0].tokens) == 3


def test_fold_constant_transposes_feeds_matmul_the_transposed_weight():
    weight = np.arange(6, dtype=np.float32).reshape(3, 2)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph)
    assert fold_constant_transposes(model) == 1
    folded = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    np.testing.assert_array_equal(folded["wt"], weight.T)


def test_last_position_rewrite_leaves_graphs_without_a_matmul_head_alone():
    graph = helper.make_graph(
        [helper.make_node("Gather", ["e", "ids"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 2])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 2, 3])],
        [numpy_helper.from_array(np.zeros((4, 3), np.float32), "e")],
    )
    model = helper.make_model(graph)
    assert not keep_last_position_logits(model)
    assert len(model.graph.node) == 1


def test_per_row_cosine_catches_one_bad_frame_that_the_whole_output_cosine_misses():
    reference = np.random.default_rng(0).standard_normal((2, 500, 16))
    tolerance = Tolerance(cosine=0.999, row_cosine=0.995)
    close = OutputError()
    close.update(reference, reference + 1e-3 * np.random.default_rng(1).standard_normal(reference.shape))
    assert close.passes(tolerance)
    one_bad_frame = reference.copy()
    one_bad_frame[1, 3] = np.random.default_rng(2).standard_normal(16)
    broken = OutputError()
    broken.update(reference, one_bad_frame)
    assert broken.cosine > 0.999 and broken.row_cosine < 0.5
    assert not broken.passes(tolerance)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--encoder", "wav2vec2", "--precision", "bf16"], "no bf16 MatMul kernel"),
        (["--encoder", "hubert", "--precision", "int4"], "for an encoder use --precision int8"),
        (["--decoder", "auto", "--precision", "int8", "--device", "cuda"], "with --device cuda use --precision fp16"),
    ],
)
def test_refused_precisions_say_what_to_use(flags, fragment, checkpoints, tmp_path, capsys):
    family = "llm" if "--decoder" in flags else flags[1]
    result = run_main(main, *flags, "--model", checkpoints[family], "--output", tmp_path / "out", capsys=capsys)
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(checkpoints, tmp_path, capsys):
    result = run_main(
        main, "--encoder", "whisper", "--model", checkpoints["whisper"], "--precision", "fp16", "--device", "cuda", "--output", tmp_path / "out", capsys=capsys
    )
    assert_user_error(result, "--device cuda")


def test_manifest_records_precision_and_reads_back(checkpoints, tmp_path):
    export_bundle(ExportOptions(family="wav2vec2", model=str(checkpoints["wav2vec2"]), output=tmp_path / "b", precision="int8"), quiet=True)
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert data["precision"] == "int8" and data["device"] == "cpu"
    assert read_manifest(tmp_path / "b").precision == "int8"


def test_min_cosine_replaces_the_reduced_precision_bound(checkpoints, tmp_path, capsys):
    strict = run_main(
        main,
        "--decoder",
        "auto",
        "--model",
        checkpoints["llm"],
        "--precision",
        "int4",
        "--min-cosine",
        "0.99999",
        "--output",
        tmp_path / "strict",
        capsys=capsys,
    )
    assert_user_error(strict, "cosine >= 0.99999")
    assert not (tmp_path / "strict").exists()
    wrong = run_main(main, "--encoder", "hubert", "--model", checkpoints["hubert"], "--min-cosine", "0.9", "--output", tmp_path / "fp32", capsys=capsys)
    assert_user_error(wrong, "--min-cosine")


def test_a_manifest_without_precision_fields_reads_as_fp32(checkpoints, tmp_path):
    from runtime.manifest import Manifest

    export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=tmp_path / "b"), quiet=True)
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    for key in ("precision", "optimizations", "device"):
        del data[key]
    older = Manifest.from_dict(data)
    assert (older.precision, older.optimizations, older.device) == ("fp32", [], "cpu")


def quantized_weights(bundle) -> np.ndarray:
    """Every int8 weight of the bundle's graph, flattened."""
    return np.concatenate([numpy_helper.to_array(t).ravel() for t in graph_proto(bundle).graph.initializer if t.data_type == onnx.TensorProto.INT8])


@pytest.mark.parametrize(("target", "weight_range"), [("avx2", "7-bit"), ("avx512-vnni", "8-bit"), ("amx", "8-bit"), ("avx-vnni", "8-bit")])
def test_int8_weights_are_made_for_the_target_cpus_kernels(target, weight_range, checkpoints, tmp_path):
    manifest = export_bundle(
        ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=tmp_path / target, precision="int8", target_cpu=target), quiet=True
    )
    weights = np.abs(quantized_weights(tmp_path / target).astype(np.int32))
    if weight_range == "7-bit":  # 2 x 255 x 64 = 32640: the u8 x s8 pair sums of AVX2 kernels cannot saturate int16
        assert weights.max() <= 64
    else:
        assert weights.max() == 127
    record = manifest.extra["int8"]
    assert record["target_cpu"] == target and record["weight_range"] == weight_range
    assert record["verified_on"]["int8_kernels"] == int8_kernels() and record["verified_on"]["model"]
    assert manifest.parity["passed"]


def test_int8_default_target_is_this_cpus_kernels_and_an_audio_llm_records_it(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("LALM_CPU_FLAGS", "avx avx2 fma")  # as an AVX2-only host reads: 7-bit weights
    manifest = export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=tmp_path / "b", precision="int8"), quiet=True)
    assert manifest.extra["int8"]["target_cpu"] == "avx2" and manifest.extra["int8"]["weight_range"] == "7-bit"
    assert manifest.extra["int8"]["verified_on"]["flags_from"] == "LALM_CPU_FLAGS"
    fp32 = export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=tmp_path / "fp32"), quiet=True)
    assert "int8" not in fp32.extra


@pytest.mark.parametrize(
    ("flags", "fragment", "code"),
    [
        (["--precision", "int8", "--target-cpu", "avx3"], "invalid choice: 'avx3'", 2),
        (["--target-cpu", "avx2"], "--target-cpu chooses the int8 recipe", 1),
    ],
)
def test_target_cpu_is_checked(flags, fragment, code, checkpoints, tmp_path, capsys):
    result = run_main(main, "--encoder", "hubert", "--model", checkpoints["hubert"], "--output", tmp_path / "b", *flags, capsys=capsys)
    assert_user_error(result, fragment)
    assert result.returncode == code and not (tmp_path / "b").exists()


def test_help_names_the_target_cpus_and_this_machines_kernels(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--target-cpu {auto,amx,avx512-vnni,avx-vnni,avx2}" in text and f"this machine's: {int8_kernels()}" in text
