"""Reading and writing ONNX graph files, with their weights beside them past protobuf's limit."""

from __future__ import annotations

from pathlib import Path

import onnx

LARGE_GRAPH_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with margin: save weights beside the graph


def is_large_model(model: onnx.ModelProto) -> bool:
    """Whether protobuf cannot hold the graph in one file: its tensors counted one by one (the
    whole ModelProto cannot even be measured past 2 GB: ByteSize fails to serialize it)."""
    tensors = sum(t.ByteSize() for t in model.graph.initializer)
    constants = sum(a.t.ByteSize() for node in model.graph.node if node.op_type == "Constant" for a in node.attribute if a.name == "value")
    return tensors + constants > LARGE_GRAPH_BYTES


def save_graph(model: onnx.ModelProto, target: Path) -> None:
    """Save, with the weights in `<name>_data` beside the graph when protobuf cannot hold them."""
    if is_large_model(model):
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=target.name + "_data")
    else:
        onnx.save_model(model, str(target))


def load_graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def data_size(graph: Path) -> int:
    """Bytes of the external-data files saved beside `graph`."""
    return sum(p.stat().st_size for p in graph.parent.glob(graph.name + "_data*"))


def graph_bytes(graph: Path) -> int:
    """Bytes of a graph file and its external-data files."""
    return graph.stat().st_size + data_size(graph)


def is_large(graph: Path) -> bool:
    return graph_bytes(graph) > LARGE_GRAPH_BYTES
