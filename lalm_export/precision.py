"""What each `--precision` means, and the graph transforms that produce it.

Every precision starts from the fp32 export and rewrites its ONNX graph:

- fp32: unchanged.
- int8 (CPU): dynamic quantization of the MatMuls with constant weights, signed int8
  weights and activations (S8S8): ONNX Runtime runs them on VNNI/AMX at several times its
  fp32 rate, while unsigned weights (QUInt8) run no faster than fp32. Convolutions, norms
  and attention stay fp32: ORT's int8 Conv is slower than its fp32 Conv, and a convolution
  rewritten as an int8 MatMul loses the quiet frames of real audio to the per-tensor
  activation scale (cosine 0.95 on wav2vec2-base; benchmarks/NOTES.md).
- int4 (decoders): weight-only MatMulNBits, symmetric blocks of 32 (`--int4-block-size`), `accuracy_level` 4
  (int8 compute); the lm_head (a tied one too) in 8-bit MatMulNBits blocks by default
  (`--int4-lm-head`): it is the layer whose rounding flips the most next tokens; weights
  rounded to nearest, or GPTQ's weights (`lalm_export/gptq.py`, `--int4-method gptq`),
  which already lie on int4 grids and are stored on those grids rather than rounded again.
- fp16 (CUDA): float16 weights and compute with float32 inputs and outputs; the RMS/layer
  norm reductions stay float32, where float16 would overflow on large activations.
- bf16: refused. ONNX Runtime's CPU provider has no bf16 MatMul kernel, and a graph that
  casts to bf16 and back would only be slower.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lalm_export.errors import OptionsError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
DEVICES = ("cpu", "cuda")
INT4_BLOCK_SIZE = 32  # the default: larger blocks decode faster and round coarser (benchmarks/NOTES.md)
INT4_BLOCK_SIZES = (16, 32, 64, 128)
INT4_LM_HEADS = ("int8", "int4")
INT4_LM_HEAD = "int8"  # the default: measured in benchmarks/NOTES.md
INT4_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: measured in benchmarks/NOTES.md
# Kept in float32 in fp16 graphs: the RMS / layer-norm reductions (x^2 overflows float16).
FP16_FLOAT32_OPS = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "LayerNormalization", "SimplifiedLayerNormalization"]
LARGE_GRAPH_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with margin: save weights beside the graph


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    weights: str  # what the manifest records as the weights' type
    roles: tuple[str, ...]
    devices: tuple[str, ...]
    summary: str


SPECS = {
    "fp32": PrecisionSpec("fp32", "float32", ("encoder", "decoder"), DEVICES, "float32 throughout: the exact graph"),
    "fp16": PrecisionSpec("fp16", "float16", ("encoder", "decoder"), DEVICES, "float16 weights and compute, float32 I/O and norms (for CUDA)"),
    "int8": PrecisionSpec("int8", "int8", ("encoder", "decoder"), ("cpu",), "dynamic S8S8 int8 MatMuls (CPU)"),
    "int4": PrecisionSpec("int4", "int4", ("decoder",), DEVICES, "int4 weight-only MatMulNBits"),
}


def check_precision(precision: str, role: str, device: str) -> PrecisionSpec:
    """The spec for `precision`, or an `OptionsError` that says what to use instead."""
    if precision == "bf16":
        raise OptionsError(
            "--precision bf16: ONNX Runtime has no bf16 MatMul kernel on the CPU provider, so a bf16 graph would run "
            "slower than fp32; use --precision int8 on CPU (faster than eager bf16) or --precision fp16 with --device cuda"
        )
    if precision not in SPECS:
        raise OptionsError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise OptionsError(f"unknown --device {device!r}; choose cpu or cuda")
    spec = SPECS[precision]
    if role not in spec.roles:
        raise OptionsError(
            f"--precision {precision} is for decoders (weight-only int4 pays off where weights dominate); "
            "for an encoder use --precision int8"
        )
    if device not in spec.devices:
        raise OptionsError(f"--precision {precision} is a CPU scheme (AMX/VNNI int8 kernels); with --device cuda use --precision fp16")
    return spec


def save_graph(model: onnx.ModelProto, target: Path) -> None:
    """Save, with the weights in `<name>_data` beside the graph when protobuf cannot hold them."""
    if model.ByteSize() > LARGE_GRAPH_BYTES:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=target.name + "_data")
    else:
        onnx.save_model(model, str(target))


def load_graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def logits_matmul(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The lm_head: the MatMul that `logits` comes from, through elementwise tails such as
    softcapping; None when there is none."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type != "MatMul":
        if node.op_type not in ("Tanh", "Mul", "Div", "Add", "Cast"):
            return None
        node = producers.get(node.input[0])
    return node


def keep_last_position_logits(model: onnx.ModelProto) -> bool:
    """Make a decoder graph compute logits for the last position only.

    Optimum's graph multiplies every prompt position by the lm_head, though generation
    needs only the last one: for a 0.5B decoder and a 128-token prompt that is ~35 GFLOP of
    waste per prompt. A Slice of the final hidden states before the lm_head MatMul removes
    it. Returns False (graph unchanged) when `logits` does not come from a MatMul."""
    node = logits_matmul(model)
    if node is None:
        return False
    hidden = node.input[0]
    sliced = hidden + "/last_position"
    constants = {
        "lalm_last_start": -1,
        "lalm_last_end": 2**62,
        "lalm_last_axis": 1,
    }
    for name, value in constants.items():
        model.graph.initializer.append(numpy_helper.from_array(_int64(value), name))
    model.graph.node.insert(
        list(model.graph.node).index(node),
        helper.make_node("Slice", [hidden, "lalm_last_start", "lalm_last_end", "lalm_last_axis"], [sliced], name="lalm/last_position"),
    )
    node.input[0] = sliced
    return True


def _int64(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int64)


def fold_constant_transposes(model: onnx.ModelProto) -> int:
    """Replace Transpose(initializer) feeding a MatMul by the transposed initializer.

    A tied lm_head is exported as MatMul(h, Transpose(embed_tokens)); the weight-only
    quantizer only rewrites MatMuls whose weight is an initializer, so without this fold
    the largest matrix of a small decoder stays fp32. The embedding keeps its own copy."""
    initializers = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.input[1] != node.output[0] for u in users):
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(initializers[node.input[0]])
        transposed = weight.transpose(perm) if perm else weight.T
        model.graph.initializer.append(numpy_helper.from_array(transposed.copy(), node.output[0]))
        model.graph.node.remove(node)
        folded += 1
    return folded


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic S8S8 quantization of the MatMuls with constant weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _root_logger_quiet():  # "consider pre-processing": advice for static quantization only
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            use_external_data_format=source.stat().st_size + _data_size(source) > LARGE_GRAPH_BYTES,
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


def _data_size(graph: Path) -> int:
    return sum(p.stat().st_size for p in graph.parent.glob(graph.name + "_data*"))


def quantize_int4(source: Path, target: Path, exact_grids: bool = False, block_size: int = INT4_BLOCK_SIZE, lm_head: str = INT4_LM_HEAD) -> dict[str, object]:
    """Weight-only int4 (MatMulNBits); the lm_head (a tied one too) in 8 bits when `lm_head`
    is "int8". With `exact_grids` (weights already on an int4 grid, e.g. from GPTQ), each
    4-bit block whose fp32 weights lie on a grid is stored on that grid instead of being
    rounded again. Returns what was done: the lm_head's precision and the exact blocks."""
    model = load_graph(source)
    fold_constant_transposes(model)
    originals = _constant_matmul_weights(model) if exact_grids else {}
    head = logits_matmul(model) if lm_head == "int8" else None
    if head is not None and not head.name:
        head.name = "lalm/lm_head"  # the quantizer selects nodes by name
    model = _matmul_nbits(model, 4, block_size, exclude=[head.name] if head is not None else [])
    if head is not None:
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head.name]
        model = _matmul_nbits(model, 8, block_size, exclude=others)
    exact = store_exact_grids(model, originals, block_size) if exact_grids else 0
    save_graph(model, target)
    facts: dict[str, object] = {"lm_head": "int8" if head is not None else "int4"}
    if exact_grids:
        facts["exact_grid_blocks"] = exact
    return facts


def _matmul_nbits(model: onnx.ModelProto, bits: int, block_size: int, exclude: list[str]) -> onnx.ModelProto:
    """The constant-weight MatMuls not in `exclude` as symmetric `bits`-bit MatMulNBits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL, nodes_to_exclude=exclude
    )
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quantizer.process()
    finally:
        logger.setLevel(level)
    return quantizer.model.model


def _constant_matmul_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    initializers = {t.name: t for t in model.graph.initializer}
    names = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers}
    return {name: numpy_helper.to_array(initializers[name]) for name in names}


def exact_int4_grid(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a MatMul weight `(K, N)`: per (column, block) the symmetric int4 values `(N, blocks,
    block)`, the scales `(N, blocks)` and whether that block lies exactly on them. A block on
    a grid whose largest value is below 8 steps (GPTQ's error feedback can shrink it) is found
    too; round-to-nearest would pick a new grid for it and round every weight again."""
    k, n = weight.shape
    blocks_k = -(-k // block)
    padded = np.pad(weight.astype(np.float32), ((0, blocks_k * block - k), (0, 0)))
    blocks = padded.T.reshape(n * blocks_k, block)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[:, None], -1)[:, 0]
    values = np.zeros(blocks.shape, dtype=np.int8)
    scales = np.zeros(largest.shape, dtype=np.float32)
    found = np.zeros(largest.shape, dtype=bool)
    remaining = np.flatnonzero(largest != 0)
    for steps in range(8, 0, -1):  # the finest grid first; every exact one dequantizes alike
        scale = largest[remaining] / np.float32(-steps)
        ratio = blocks[remaining] / scale[:, None]
        rounded = np.round(ratio)
        fits = (np.abs(ratio - rounded) <= 1e-3).all(-1) & (rounded >= -8).all(-1) & (rounded <= 7).all(-1)
        hits = remaining[fits]
        values[hits] = rounded[fits].astype(np.int8)
        scales[hits] = scale[fits]
        found[hits] = True
        remaining = remaining[~fits]  # most blocks fit the first grid: later ones try only the rest
        if remaining.size == 0:
            break
    return values.reshape(n, blocks_k, block), scales.reshape(n, blocks_k), found.reshape(n, blocks_k)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """MatMulNBits' 4-bit layout: value + 8, two per byte, the even element in the low nibble."""
    unsigned = (values.astype(np.int16) + 8).astype(np.uint8)
    return unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)


def store_exact_grids(model: onnx.ModelProto, originals: dict[str, np.ndarray], block: int) -> int:
    """Overwrite the MatMulNBits blocks whose fp32 source lies on an int4 grid with that grid."""
    initializers = {t.name: t for t in model.graph.initializer}
    stored = 0
    for node in model.graph.node:
        source = originals.get(node.input[1].removesuffix("_Q4")) if _is_4_bit(node) else None
        if source is None:
            continue
        values, scales, exact = exact_int4_grid(source, block)
        packed_init, scales_init = initializers[node.input[1]], initializers[node.input[2]]
        packed = numpy_helper.to_array(packed_init).copy()
        stored_scales = numpy_helper.to_array(scales_init).copy()
        packed[exact] = pack_int4(values)[exact]
        stored_scales.reshape(scales.shape)[exact] = scales[exact]
        packed_init.CopyFrom(numpy_helper.from_array(packed, packed_init.name))
        scales_init.CopyFrom(numpy_helper.from_array(stored_scales, scales_init.name))
        stored += int(exact.sum())
    return stored


def _is_4_bit(node: onnx.NodeProto) -> bool:
    return node.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 4 for a in node.attribute)


def convert_fp16(source: Path, target: Path, role: str) -> None:
    """float16 weights and compute. Encoders keep float32 inputs and outputs; decoders keep
    float32 logits, and their KV cache becomes float16 (half the memory traffic)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_graph(source)
    keep = True if role == "encoder" else ["logits"]
    converted = convert_float_to_float16(model, keep_io_types=keep, op_block_list=FP16_FLOAT32_OPS, disable_shape_infer=model.ByteSize() > LARGE_GRAPH_BYTES)
    save_graph(converted, target)


def apply_precision(
    source: Path, target: Path, precision: str, role: str, exact_grids: bool = False, int4_block_size: int = INT4_BLOCK_SIZE, int4_lm_head: str = INT4_LM_HEAD
) -> dict[str, object]:
    """Write the `precision` graph for the fp32 graph `source` to `target`; `exact_grids`: the
    weights are already on int4 grids (GPTQ), keep them there. Returns facts for the manifest."""
    if precision == "int8":
        quantize_int8(source, target)
    elif precision == "int4":
        return quantize_int4(source, target, exact_grids, int4_block_size, int4_lm_head)
    elif precision == "fp16":
        convert_fp16(source, target, role)
    else:
        raise OptionsError(f"no graph transform for --precision {precision}")
    return {}
