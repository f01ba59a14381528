"""Graph rewrites that keep the math: the same outputs from less work or in a form the
quantizers can read."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


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


LAST_POSITION_LOGITS = "logits for the last position only"  # the manifest's name for this rewrite


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
        model.graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
    model.graph.node.insert(
        list(model.graph.node).index(node),
        helper.make_node("Slice", [hidden, "lalm_last_start", "lalm_last_end", "lalm_last_axis"], [sliced], name="lalm/last_position"),
    )
    node.input[0] = sliced
    return True


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
