"""The int8 and fp16 graph transforms (int4's lives in `lalm_export/int4.py`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from lalm_export.graph_files import LARGE_GRAPH_BYTES, is_large, load_graph, save_graph

# Kept in float32 in fp16 graphs: the RMS / layer-norm reductions (x^2 overflows float16).
FP16_FLOAT32_OPS = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "LayerNormalization", "SimplifiedLayerNormalization"]


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic S8S8 quantization of the MatMuls with constant weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _root_logger_quiet():  # "consider pre-processing": advice for static quantization only
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            use_external_data_format=is_large(source),
            # DefaultTensorType: the quantizer cannot infer some exported tensors' types otherwise.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
        )


@contextmanager
def _root_logger_quiet() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def convert_fp16(source: Path, target: Path, role: str) -> None:
    """float16 weights and compute. Encoders keep float32 inputs and outputs; decoders keep
    float32 logits, and their KV cache becomes float16 (half the memory traffic)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_graph(source)
    keep = True if role == "encoder" else ["logits"]
    converted = convert_float_to_float16(model, keep_io_types=keep, op_block_list=FP16_FLOAT32_OPS, disable_shape_infer=model.ByteSize() > LARGE_GRAPH_BYTES)
    save_graph(converted, target)
