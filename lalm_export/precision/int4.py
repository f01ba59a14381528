"""int4 weights: the options, the grid rule, and the MatMulNBits transform.

The grid is the one ONNX Runtime's MatMulNBits stores: symmetric blocks along the input
dimension, each block's largest-magnitude weight at -8 (`block_scale`), values rounded and
clipped to [-8, 7] (`grid_levels`). GPTQ (`lalm_export/precision/gptq.py`) rounds onto this grid and the
packer here recovers it, so both read the rule from this module."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import numpy_helper

from lalm_export.errors import OptionsError
from lalm_export.graphs.files import load_graph, save_graph
from lalm_export.graphs.rewrites import fold_constant_transposes, logits_matmul

INT4_METHODS = ("rtn", "gptq")
INT4_BLOCK_SIZE = 32  # the default: larger blocks decode faster and round coarser (docs/performance-notes.md)
INT4_BLOCK_SIZES = (16, 32, 64, 128)
INT4_LM_HEADS = ("int8", "int4")
INT4_LM_HEAD = "int8"  # the default: the layer whose rounding flips the most next tokens (docs/performance-notes.md)
INT4_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits (docs/performance-notes.md)
INT4_LOW, INT4_HIGH = -8, 7

Array = TypeVar("Array", np.ndarray, Any)  # numpy arrays and torch tensors alike


def block_scale(largest: Array, steps: int = -INT4_LOW) -> Array:
    """The scale of a block whose largest-magnitude weight (signed) lies `steps` grid steps
    below zero: at -8 for a fresh block; fewer when GPTQ's error feedback shrank it."""
    return largest / -steps


def grid_levels(ratio: Array) -> Array:
    """Weights divided by their block's scale, as the int4 values they are stored as."""
    return ratio.round().clip(INT4_LOW, INT4_HIGH)


@dataclass(frozen=True)
class Int4Options:
    """How `--precision int4` makes its weights; every rule checked in `validate`."""

    method: str = "rtn"  # rtn: round to nearest; gptq: error-compensating, on `calibration` text or the model's samples
    block_size: int = INT4_BLOCK_SIZE
    lm_head: str = INT4_LM_HEAD  # the lm_head in 8-bit or 4-bit blocks
    calibration: Path | None = None

    @property
    def exact_grids(self) -> bool:
        """The weights come from GPTQ already on int4 grids: store them there, do not round again."""
        return self.method == "gptq"

    def describe(self) -> str:
        return f"blocks of {self.block_size}, lm_head {self.lm_head}"

    def validate(self, precision: str) -> None:
        if self.method not in INT4_METHODS:
            raise OptionsError(f"unknown --int4-method {self.method!r}; choose one of {', '.join(INT4_METHODS)}")
        if self.method == "gptq" and precision != "int4":
            raise OptionsError("--int4-method gptq chooses int4 weights: pass --precision int4")
        if self.calibration is not None and self.method != "gptq":
            raise OptionsError("--calibration is read by --int4-method gptq; add it, or drop --calibration")
        if self.block_size not in INT4_BLOCK_SIZES:
            raise OptionsError(f"--int4-block-size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, not {self.block_size}")
        if self.block_size != INT4_BLOCK_SIZE and precision != "int4":
            raise OptionsError("--int4-block-size is for --precision int4")
        if self.lm_head not in INT4_LM_HEADS:
            raise OptionsError(f"unknown --int4-lm-head {self.lm_head!r}; choose one of {', '.join(INT4_LM_HEADS)}")
        if self.lm_head != INT4_LM_HEAD and precision != "int4":
            raise OptionsError("--int4-lm-head is for --precision int4")
        if self.calibration is not None and Path(self.calibration).is_dir():
            raise OptionsError(f"--calibration {self.calibration} is a folder; pass a UTF-8 text file")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise OptionsError(f"--calibration {self.calibration} does not exist; pass a UTF-8 text file")


def quantize_int4(source: Path, target: Path, options: Int4Options) -> dict[str, object]:
    """Weight-only int4 (MatMulNBits); the lm_head (a tied one too) in 8 bits when
    `options.lm_head` is "int8". With exact grids (GPTQ's weights), each 4-bit block whose
    fp32 weights lie on a grid is stored on that grid instead of being rounded again.
    Returns what was done: the lm_head's precision and the exact blocks."""
    model = load_graph(source)
    fold_constant_transposes(model)
    originals = _constant_matmul_weights(model) if options.exact_grids else {}
    head = logits_matmul(model) if options.lm_head == "int8" else None
    if head is not None and not head.name:
        head.name = "lalm/lm_head"  # the quantizer selects nodes by name
    model = _matmul_nbits(model, 4, options.block_size, exclude=[head.name] if head is not None else [])
    if head is not None:
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head.name]
        model = _matmul_nbits(model, 8, options.block_size, exclude=others)
    exact = store_exact_grids(model, originals, options.block_size) if options.exact_grids else 0
    save_graph(model, target)
    facts: dict[str, object] = {"lm_head": "int8" if head is not None else "int4"}
    if options.exact_grids:
        facts["exact_grid_blocks"] = exact
    return facts


def _matmul_nbits(model: onnx.ModelProto, bits: int, block_size: int, exclude: list[str]) -> onnx.ModelProto:
    """The constant-weight MatMuls not in `exclude` as symmetric `bits`-bit MatMulNBits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL, nodes_to_exclude=exclude)
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
    for steps in range(-INT4_LOW, 0, -1):  # the finest grid first; every exact one dequantizes alike
        scale = block_scale(largest[remaining], steps)
        ratio = blocks[remaining] / scale[:, None]
        rounded = grid_levels(ratio)
        fits = (np.abs(ratio - rounded) <= 1e-3).all(-1)
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
    unsigned = (values.astype(np.int16) - INT4_LOW).astype(np.uint8)
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
