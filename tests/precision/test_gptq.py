"""GPTQ int4: weights on MatMulNBits' grid survive the int4 export bit for bit, GPTQ lowers
a layer's output error below round-to-nearest, and `--int4-method gptq` exports end to end."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lalm_export.cli import main
from lalm_export.export.component import ExportOptions, export_bundle
from lalm_export.models.families import get_family
from lalm_export.models.llm import load_tokenizer
from lalm_export.models.loading import load_family_model
from lalm_export.precision.gptq import (
    CALIBRATION_WINDOW,
    calibration_windows,
    first_layer_inputs,
    gptq_quantize_decoder,
    gptq_weight,
    quantize_to_grid,
    run_layer,
    sampled_calibration_windows,
    signed_block_scales,
)
from lalm_export.precision.int4 import INT4_BLOCK_SIZE, Int4Options, exact_int4_grid, pack_int4, quantize_int4
from runtime.manifest import read_manifest
from tests.helpers import assert_user_error, run_cli, run_main

CALIBRATION_TEXT = " ".join(["the quick brown fox jumps over the lazy dog, and one two three four five six seven."] * 40)


def grid_weight(k: int, n: int, largest_step: int, seed: int = 0) -> np.ndarray:
    """A MatMul weight `(K, N)` on per-block int4 grids whose largest magnitude is `largest_step` steps."""
    rng = np.random.default_rng(seed)
    values = rng.integers(-largest_step + 1, largest_step, size=(n, k // INT4_BLOCK_SIZE, INT4_BLOCK_SIZE))
    values[..., 3] = -largest_step  # the block's largest magnitude, on the negative side
    scales = rng.uniform(0.01, 0.1, size=(n, k // INT4_BLOCK_SIZE)) * rng.choice([-1, 1], size=(n, k // INT4_BLOCK_SIZE))
    return (values * scales[..., None]).astype(np.float32).reshape(n, k).T.copy()


def matmul_graph(weight: np.ndarray, path) -> None:
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def stored_int4(path) -> tuple[np.ndarray, np.ndarray]:
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return initializers[node.input[1]], initializers[node.input[2]]


def dequantized(path, k: int, n: int, block: int = INT4_BLOCK_SIZE) -> np.ndarray:
    packed, scales = stored_int4(path)
    low, high = (packed & 0x0F).astype(np.int16) - 8, (packed >> 4).astype(np.int16) - 8
    values = np.stack([low, high], axis=-1).reshape(n, -1, block)
    return (values * scales.reshape(n, -1)[..., None]).reshape(n, -1)[:, :k].T


def test_our_int4_packing_is_onnx_runtimes(tmp_path):
    weight = grid_weight(96, 8, largest_step=8)
    matmul_graph(weight, tmp_path / "fp32.onnx")
    quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", Int4Options())
    packed, scales = stored_int4(tmp_path / "int4.onnx")
    values, our_scales, exact = exact_int4_grid(weight, INT4_BLOCK_SIZE)
    assert exact.all()
    np.testing.assert_array_equal(pack_int4(values), packed)
    np.testing.assert_array_equal(our_scales, scales.reshape(our_scales.shape))


def test_weights_on_a_narrower_grid_are_stored_exactly_not_rounded_again(tmp_path):
    weight = grid_weight(96, 8, largest_step=5)
    matmul_graph(weight, tmp_path / "fp32.onnx")
    quantize_int4(tmp_path / "fp32.onnx", tmp_path / "rtn.onnx", Int4Options())
    assert quantize_int4(tmp_path / "fp32.onnx", tmp_path / "exact.onnx", Int4Options(method="gptq"))["exact_grid_blocks"] == 8 * 3
    np.testing.assert_allclose(dequantized(tmp_path / "exact.onnx", 96, 8), weight, rtol=0, atol=1e-7)
    assert np.abs(dequantized(tmp_path / "rtn.onnx", 96, 8) - weight).max() > 1e-3
    # Off-grid weights keep round-to-nearest, bit for bit.
    noisy = weight + np.random.default_rng(1).normal(0, 1e-3, weight.shape).astype(np.float32)
    matmul_graph(noisy, tmp_path / "noisy.onnx")
    quantize_int4(tmp_path / "noisy.onnx", tmp_path / "noisy-rtn.onnx", Int4Options())
    assert quantize_int4(tmp_path / "noisy.onnx", tmp_path / "noisy-exact.onnx", Int4Options(method="gptq"))["exact_grid_blocks"] == 0
    np.testing.assert_array_equal(stored_int4(tmp_path / "noisy-rtn.onnx")[0], stored_int4(tmp_path / "noisy-exact.onnx")[0])


def test_gptq_lowers_the_layer_output_error_below_round_to_nearest():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 128, generator=generator)
    # Inputs of low effective rank plus noise, as a transformer's activations are.
    x = torch.randn(4096, 16, generator=generator) @ torch.randn(16, 128, generator=generator) + 0.1 * torch.randn(4096, 128, generator=generator)
    hessian = 2 * x.T @ x / x.shape[0]
    scales = signed_block_scales(weight, INT4_BLOCK_SIZE)
    rtn = torch.cat([quantize_to_grid(weight[:, i], scales[:, i // INT4_BLOCK_SIZE])[:, None] for i in range(128)], dim=1)
    gptq = gptq_weight(weight, hessian, INT4_BLOCK_SIZE)
    rtn_error = torch.linalg.norm(x @ (rtn - weight).T)
    gptq_error = torch.linalg.norm(x @ (gptq - weight).T)
    assert gptq_error < 0.5 * rtn_error, (float(gptq_error), float(rtn_error))
    assert exact_int4_grid(gptq.T.numpy(), INT4_BLOCK_SIZE)[2].all(), "GPTQ's weights lie on MatMulNBits grids"


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(CALIBRATION_TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("block, lm_head", [(32, "int4"), (64, "int8")])
def test_gptq_export_stores_the_gptq_weights(block, lm_head, checkpoints, calibration_file, tmp_path):
    checkpoint = str(checkpoints["llm"])
    bundle = tmp_path / "gptq"
    options = ExportOptions(
        family="llm",
        model=checkpoint,
        output=bundle,
        precision="int4",
        int4=Int4Options(method="gptq", calibration=calibration_file, block_size=block, lm_head=lm_head),
    )
    manifest = export_bundle(options, quiet=True)
    int4 = manifest.extra["int4"]
    assert int4["method"] == "gptq" and int4["calibration"] == "text file" and int4["windows"] >= 2 and manifest.parity["passed"]
    assert int4["block_size"] == block and int4["lm_head"] == lm_head
    assert int4["layers"] == 2 * 7 + (lm_head == "int4")
    model = load_family_model(get_family("llm"), checkpoint).float().eval()
    reference = copy.deepcopy(model)
    gptq_quantize_decoder(reference, calibration_windows(calibration_file, load_tokenizer(checkpoint)), block, lm_head=lm_head == "int4", progress=False)
    proto = onnx.load(str(bundle / read_manifest(bundle).graphs["model"].path))
    lm_head_node = next(n for n in proto.graph.node if "logits" in n.output)
    attributes = {a.name: a.i for a in lm_head_node.attribute}
    assert attributes["block_size"] == block and attributes["bits"] == {"int4": 4, "int8": 8}[lm_head]
    head_changed = not np.allclose(reference.lm_head.weight.detach().numpy(), model.lm_head.weight.detach().numpy())
    assert head_changed == (lm_head == "int4"), "GPTQ rounds the lm_head only when it is stored in 4 bits"
    if lm_head == "int4":
        k, n = int(reference.lm_head.in_features), int(reference.lm_head.out_features)
        onnx.save_model(helper.make_model(helper.make_graph([lm_head_node], "g", [], [], list(proto.graph.initializer))), str(tmp_path / "head.onnx"))
        np.testing.assert_allclose(dequantized(tmp_path / "head.onnx", k, n, block), reference.lm_head.weight.detach().numpy().T, rtol=0, atol=1e-6)


def test_layer_by_layer_inputs_reproduce_the_model(checkpoints):
    model = load_family_model(get_family("llm"), str(checkpoints["llm"])).float().eval()
    batch = torch.from_numpy(np.random.default_rng(0).integers(3, 100, size=(2, 12)))
    ((hidden, kwargs),) = first_layer_inputs(model, [batch])
    for layer in model.get_decoder().layers:
        hidden = run_layer(layer, hidden, kwargs)
    with torch.no_grad():
        logits = model.lm_head(model.get_decoder().norm(hidden))
        torch.testing.assert_close(logits, model(input_ids=batch).logits, rtol=1e-5, atol=1e-5)


def test_self_calibration_samples_full_windows_reproducibly(checkpoints):
    checkpoint = str(checkpoints["llm"])
    model = load_family_model(get_family("llm"), checkpoint).float().eval()
    tokenizer = load_tokenizer(checkpoint)
    windows = sampled_calibration_windows(model, tokenizer, seed=3, count=20)
    assert windows.shape == (20, CALIBRATION_WINDOW) and windows.dtype == np.int64
    np.testing.assert_array_equal(windows, sampled_calibration_windows(model, tokenizer, seed=3, count=20))
    assert not np.array_equal(windows, sampled_calibration_windows(model, tokenizer, seed=4, count=20))
    assert len(np.unique(windows)) > 20, "sampled, not a repeated greedy token"


def test_self_calibration_needs_a_start_token():
    from types import SimpleNamespace

    from lalm_export.errors import OptionsError

    with pytest.raises(OptionsError, match="needs a BOS or EOS token; pass --calibration FILE"):
        sampled_calibration_windows(None, SimpleNamespace(bos_token_id=None, eos_token_id=None), seed=0)


def test_gptq_without_calibration_text_calibrates_on_model_samples(checkpoints, tmp_path):
    bundle = tmp_path / "gptq-self"
    result = run_cli("--decoder", "auto", "--model", checkpoints["llm"], "--precision", "int4", "--int4-method", "gptq", "--output", bundle)
    assert result.returncode == 0, result.stderr
    assert "sampling calibration text from the model" in result.stderr + result.stdout
    int4 = read_manifest(bundle).extra["int4"]
    assert int4["method"] == "gptq" and int4["calibration"] == "model samples" and int4["seed"] == 0
    assert int4["windows"] == 64 and int4["tokens_per_window"] == CALIBRATION_WINDOW and "calibration_text" not in int4
    assert read_manifest(bundle).parity["passed"]


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--precision", "int8", "--int4-method", "gptq", "--calibration", "CAL"], "pass --precision int4"),
        (["--precision", "int4", "--calibration", "CAL"], "--calibration is read by --int4-method gptq"),
        (["--precision", "int4", "--int4-method", "gptq", "--calibration", "MISSING"], "does not exist"),
        (["--precision", "int4", "--int4-method", "gptq", "--calibration", "SHORT"], "GPTQ needs at least"),
        (["--precision", "int8", "--int4-block-size", "64"], "--int4-block-size is for --precision int4"),
        (["--precision", "int8", "--int4-lm-head", "int4"], "--int4-lm-head is for --precision int4"),
    ],
)
def test_gptq_user_errors(flags, fragment, checkpoints, calibration_file, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("hello there", encoding="utf-8")
    paths = {"CAL": calibration_file, "MISSING": tmp_path / "nope.txt", "SHORT": short}
    result = run_main(main, "--decoder", "auto", "--model", checkpoints["llm"], "--output", tmp_path / "out", *[paths.get(f, f) for f in flags], capsys=capsys)
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()
