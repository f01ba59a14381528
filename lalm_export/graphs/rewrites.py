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


FUSED_ATTENTION = "self-attention fused into MultiHeadAttention"  # the manifest's name for this rewrite


def fuse_attention(model: onnx.ModelProto) -> int:
    """Replace each unmasked self-attention of an exported encoder, `Softmax(q k^T) v` as
    torch.onnx writes it (Reshape and Transpose of the projections into heads, a scale Mul on
    each side, MatMul, Softmax, MatMul, back to `(batch, frames, width)`), by ONNX Runtime's
    `com.microsoft.MultiHeadAttention` on the projections, which computes it without the
    `(heads, frames, frames)` score tensor's round trips through memory (Whisper tiny.en's
    30 s window: 1,500 frames, 54 MB of scores a layer). Attention with a mask (an Add before
    the Softmax) and cross-attention (q from another tensor than k and v: a Q-Former's, whose
    queries may have another batch size) are left as they are. Returns how many were fused."""
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = constant_values(model)
    fused = 0
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        found = attention_around(softmax, producers, consumers, constants)
        if found is None:
            continue
        (query, key, value), output, heads, scale, last = found
        attention = helper.make_node(
            "MultiHeadAttention", [query, key, value], [output], name=last.name + "/fused_attention", domain="com.microsoft", num_heads=heads, scale=scale
        )
        position = list(model.graph.node).index(last)
        model.graph.node.remove(last)
        model.graph.node.insert(position, attention)
        fused += 1
    if fused:
        remove_unused_nodes(model)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The values of the graph's initializers and Constant nodes, by output name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def attention_around(
    softmax: onnx.NodeProto, producers: dict, consumers: dict, constants: dict[str, np.ndarray]
) -> tuple[tuple[str, str, str], str, int, float, onnx.NodeProto] | None:
    """The pieces of the self-attention whose Softmax is `softmax`: the (query, key, value)
    projections, the name of the merged heads' output, the head count, the product of the
    scales, and the node that writes that output; None where the pattern differs."""

    def single(name: str, op: str) -> onnx.NodeProto | None:
        node = producers.get(name)
        return node if node is not None and node.op_type == op else None

    def perm(node: onnx.NodeProto | None) -> list[int] | None:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), None) if node is not None else None

    def scaled(name: str) -> tuple[str, float]:
        node = producers.get(name)
        if node is not None and node.op_type == "Mul" and node.input[1] in constants and constants[node.input[1]].size == 1:
            return node.input[0], float(constants[node.input[1]].reshape(-1)[0])
        return name, 1.0

    def split_of(reshape: onnx.NodeProto) -> tuple[int, int] | None:
        """(heads, head size) of a Reshape into `(batch, frames, heads, head size)`; either may be -1."""
        shape = reshape.input[1]
        if shape in constants and constants[shape].size == 4:
            return int(constants[shape][2]), int(constants[shape][3])
        concat = single(shape, "Concat")
        if concat is not None and len(concat.input) == 4 and all(name in constants for name in concat.input[2:]):
            return int(constants[concat.input[2]].reshape(-1)[0]), int(constants[concat.input[3]].reshape(-1)[0])
        return None

    def projection(reshape: onnx.NodeProto) -> tuple[str, int] | None:
        """The input and width of the projection a head split reads: a MatMul by a weight
        (through a scale Mul, Whisper's on q, and a bias Add); None where it is something else."""
        node = producers.get(scaled(reshape.input[0])[0])
        if node is not None and node.op_type == "Add":
            node = next((producers[name] for name in node.input if name in producers and producers[name].op_type == "MatMul"), None)
        if node is None or node.op_type != "MatMul" or node.input[1] not in constants or constants[node.input[1]].ndim != 2:
            return None
        return node.input[0], int(constants[node.input[1]].shape[1])

    def readers(name: str) -> list[onnx.NodeProto]:
        """The nodes that read `name`, but for Shape nodes (torch.onnx's size lookups, unused once fused)."""
        return [node for node in consumers.get(name, []) if node.op_type != "Shape"]

    def splits_heads(reshape: onnx.NodeProto) -> bool:
        """A Reshape to `(batch, heads or -1, frames, head size)`: the shape the context already has."""
        concat = single(reshape.input[1], "Concat")
        second = constants.get(concat.input[1]) if concat is not None and len(concat.input) == 4 else None
        return second is not None and second.size == 1 and int(second.reshape(-1)[0]) in (-1, heads)

    scores = single(softmax.input[0], "MatMul")
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    users = consumers.get(softmax.output[0], [])
    if scores is None or axis not in (-1, 3) or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
        return None
    context = users[0]
    (q_heads, q_scale), (k_heads, k_scale) = scaled(scores.input[0]), scaled(scores.input[1])
    q_t, k_t, v_t = single(q_heads, "Transpose"), single(k_heads, "Transpose"), single(context.input[1], "Transpose")
    if perm(q_t) != [0, 2, 1, 3] or perm(k_t) != [0, 2, 3, 1] or perm(v_t) != [0, 2, 1, 3]:
        return None
    q_r, k_r, v_r = (single(t.input[0], "Reshape") for t in (q_t, k_t, v_t))
    splits = [split_of(r) for r in (q_r, k_r, v_r) if r is not None]
    if len(splits) != 3 or None in splits:
        return None
    projections = [projection(r) for r in (q_r, k_r, v_r)]
    if None in projections or len({source for source, _ in projections}) != 1:  # self-attention: q, k, v from one tensor
        return None
    sizes, widths = {size for _, size in splits}, {width for _, width in projections}
    # wav2vec2-style exports write the head count as -1 in every split: then it is the width over the head size
    known = {h for h, _ in splits if h > 0} or {width // size for width in widths for size in sizes if size > 0 and width % size == 0}
    if len(known) != 1 or len(sizes) != 1 or len(widths) != 1:  # one head count, one head size, one width
        return None
    heads = known.pop()
    out_users = readers(context.output[0])
    if len(out_users) == 1 and out_users[0].op_type == "Reshape" and splits_heads(out_users[0]):  # torch.onnx's reshape to the shape it has
        out_users = readers(out_users[0].output[0])
    out_t = out_users[0] if len(out_users) == 1 and out_users[0].op_type == "Transpose" else None
    merge_users = readers(out_t.output[0]) if out_t is not None else []
    merge = merge_users[0] if len(merge_users) == 1 and merge_users[0].op_type == "Reshape" else None
    if merge is None or perm(out_t) != [0, 2, 1, 3]:
        return None
    return (q_r.input[0], k_r.input[0], v_r.input[0]), merge.output[0], heads, q_scale * k_scale, merge


def remove_unused_nodes(model: onnx.ModelProto) -> None:
    """Drop the nodes none of whose outputs is read (by a node or as a graph output), until none is left."""
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {name for node in model.graph.node for name in node.input} | outputs
        unused = [node for node in model.graph.node if not any(out in read for out in node.output)]
        if not unused:
            return
        for node in unused:
            model.graph.node.remove(node)
