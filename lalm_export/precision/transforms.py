"""The int8 and fp16 graph transforms (int4's lives in `lalm_export/precision/int4.py`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx

from lalm_export.graphs.files import is_large, is_large_model, load_graph, save_graph
from runtime.cpu import int8_kernels, saturates

# Kept in float32 in fp16 graphs: the RMS / layer-norm reductions (x^2 overflows float16).
FP16_FLOAT32_OPS = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "LayerNormalization", "SimplifiedLayerNormalization"]


@dataclass(frozen=True)
class Int8Recipe:
    """How int8 weights are made for one class of ONNX Runtime int8 kernels (runtime/cpu.py)."""

    target_cpu: str
    reduce_range: bool  # 7-bit weights: the u8 x s8 pair sums of non-VNNI kernels cannot saturate
    per_channel: bool  # a scale per output channel: wins back the bit 7-bit weights lose

    def to_dict(self) -> dict[str, object]:
        return {
            "target_cpu": self.target_cpu,
            "weights": f"int8, per {'output channel' if self.per_channel else 'tensor'}, symmetric",
            "weight_range": "7-bit" if self.reduce_range else "8-bit",
            "activations": "uint8, per tensor, dynamic",
        }


def int8_recipe(target_cpu: str) -> Int8Recipe:
    """The recipe for `target_cpu` (auto: this machine's kernels, where the parity gate runs):
    where the kernels saturate (AVX2, AVX-512 without VNNI),
    7-bit weights with a scale per output channel (per tensor, 7 bits lose too much at base
    sizes: docs/performance-notes.md); where they sum in int32 (VNNI, AMX), 8-bit weights
    per tensor."""
    target_cpu = int8_kernels() if target_cpu == "auto" else target_cpu
    saturating = saturates(target_cpu)
    return Int8Recipe(target_cpu, reduce_range=saturating, per_channel=saturating)


def quantize_int8(source: Path, target: Path, recipe: Int8Recipe, exclude: Sequence[str] = ()) -> None:
    """Dynamic quantization of the MatMuls with constant weights (but the nodes named in
    `exclude`): uint8 activations, int8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _root_logger_quiet():  # "consider pre-processing": advice for static quantization only
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            reduce_range=recipe.reduce_range,
            per_channel=recipe.per_channel,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=list(exclude),
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
    converted = convert_float_to_float16(model, keep_io_types=keep, op_block_list=FP16_FLOAT32_OPS, disable_shape_infer=is_large_model(model))
    save_graph(converted, target)
