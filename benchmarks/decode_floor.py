"""How close a decoder bundle's decode step comes to its memory-bandwidth floor.

    python -m benchmarks.decode_floor BUNDLE [BUNDLE ...] [--rounds 5] [--steps 32]

The floor is the weight bytes a step reads over the machine's read bandwidth. On a shared
VM that bandwidth moves by almost 2x from one minute to the next, so it is measured in
every round, interleaved with the bundles' decode steps, and each round's steps are held
against that round's bandwidth. Each round also runs the bundle's weight kernels alone (its
MatMulNBits and constant-weight MatMuls on one token, without the rest of the graph): how fast
ONNX Runtime's kernels stream those weights is the ceiling a step can reach, whatever the
bandwidth. Prints one line per bundle and, with --json, the figures."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from benchmarks.machine import memory_read_gbs
from benchmarks.run import weight_bytes_per_token
from runtime.api import load
from runtime.manifest import read_manifest


def significant(value: float, digits: int = 3) -> float:
    """Rounded to significant digits, not decimals: a tiny model's fraction of the floor
    (0.0004) must not print as 0."""
    return float(f"{value:.{digits}g}")


def decode_step_seconds(bundle_backend, prompt: np.ndarray, steps: int) -> float:
    """Median seconds of `steps` greedy decode steps after a prefill of `prompt`."""
    logits = bundle_backend.prefill(prompt, np.ones_like(prompt))
    times = []
    for _ in range(steps):
        token = logits.argmax(-1)
        start = time.perf_counter()
        logits = bundle_backend.decode_step(token)
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


WEIGHT_KERNEL_OPS = ("MatMulNBits", "MatMul")
KERNEL_SHARE = 0.9  # the kernels are measured when they hold this share of a step's weight bytes


def weight_kernels_model(graph: Path) -> tuple[onnx.ModelProto, dict[str, int], int]:
    """The graph's weight kernels alone: every MatMulNBits and constant-weight MatMul, each fed
    one token of its input width. Returns the model, its inputs' widths and its weight bytes."""
    source = onnx.load(str(graph), load_external_data=True)
    initializers = {t.name: t for t in source.graph.initializer}
    nodes, used, widths = [], [], {}
    for node in source.graph.node:
        if node.op_type not in WEIGHT_KERNEL_OPS or node.input[1] not in initializers:
            continue
        width = next((a.i for a in node.attribute if a.name == "K"), None) or initializers[node.input[1]].dims[0]
        kernel = onnx.NodeProto()
        kernel.CopyFrom(node)
        kernel.input[0] = f"token_{width}"
        widths[kernel.input[0]] = width
        nodes.append(kernel)
        used.extend(name for name in node.input[1:] if name in initializers)
    weights = [initializers[name] for name in dict.fromkeys(used)]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "weight_kernels",
            [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, width]) for name, width in widths.items()],
            [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None) for n in nodes for out in n.output],
            weights,
        ),
        opset_imports=source.opset_import,
    )
    return model, widths, sum(onnx.numpy_helper.to_array(t).nbytes for t in weights)


def weight_kernels_seconds(session: ort.InferenceSession, widths: dict[str, int], repeats: int = 9) -> float:
    """Median seconds of one run of the weight kernels."""
    feed = {name: np.random.default_rng(0).standard_normal((1, width)).astype(np.float32) for name, width in widths.items()}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def load_weight_kernels(graph: Path, step_weight_bytes: int) -> tuple[ort.InferenceSession, dict[str, int], int] | None:
    """A session of the graph's weight kernels, or None when they hold too small a share of
    the step's weights to stand for it (e.g. int8 graphs, whose kernels are other ops)."""
    model, widths, kernel_bytes = weight_kernels_model(graph)
    if kernel_bytes < KERNEL_SHARE * step_weight_bytes:
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:  # over protobuf's 2 GB limit in memory; a file takes any size
        path = Path(tmp) / "kernels.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="kernels.onnx.data")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, widths, kernel_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="decoder bundles written by lalm-export")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per bundle and round (default: 32)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    backends, weights, kernels, vocab = {}, {}, {}, 32_000
    for bundle in args.bundles:
        manifest = read_manifest(bundle)
        if manifest.role != "decoder":
            print(f"decode_floor: error: {bundle} is a {manifest.role} bundle; pass decoder bundles", file=sys.stderr)
            return 1
        backends[str(bundle)] = load(bundle).backend
        vocab = min(vocab, int(manifest.extra.get("vocab_size", vocab)))
        weights[str(bundle)] = weight_bytes_per_token(bundle / manifest.graphs["model"].path)
        kernels[str(bundle)] = load_weight_kernels(bundle / manifest.graphs["model"].path, weights[str(bundle)])
    prompt = np.random.default_rng(0).integers(3, vocab, size=(1, args.prompt))
    fractions: dict[str, list[float]] = {name: [] for name in backends}
    steps: dict[str, list[float]] = {name: [] for name in backends}
    kernel_rates: dict[str, list[float]] = {name: [] for name in backends}
    bandwidths = []
    for _ in range(args.rounds):
        bandwidth = memory_read_gbs() * 1e9
        bandwidths.append(bandwidth)
        for name, backend in backends.items():
            seconds = decode_step_seconds(backend, prompt, args.steps)
            steps[name].append(seconds)
            fractions[name].append(weights[name] / bandwidth / seconds)
            if kernels[name] is not None:
                session, widths, kernel_bytes = kernels[name]
                kernel_rates[name].append(kernel_bytes / weight_kernels_seconds(session, widths))
    figures = {
        "torch_threads": torch.get_num_threads(),
        "bandwidth_gbs_median": round(float(np.median(bandwidths)) / 1e9, 1),
        "bandwidth_gbs_range": [round(min(bandwidths) / 1e9, 1), round(max(bandwidths) / 1e9, 1)],
        "bundles": {
            name: {
                "weights_mb_per_token": round(weights[name] / 1e6, 1),
                "step_ms_median": round(float(np.median(steps[name])) * 1e3, 2),
                "floor_fraction_median": significant(float(np.median(fractions[name]))),
                "floor_fraction_range": [significant(min(fractions[name])), significant(max(fractions[name]))],
                "weight_kernels": _kernel_figures(kernel_rates[name], bandwidths, weights[name] / np.array(steps[name])),
            }
            for name in backends
        },
    }
    for name, f in figures["bundles"].items():
        print(
            f"{name}: step {f['step_ms_median']} ms, {f['weights_mb_per_token']} MB/token, "
            f"{f['floor_fraction_median']:.0%} of the bandwidth floor (rounds: {f['floor_fraction_range'][0]:.0%}–{f['floor_fraction_range'][1]:.0%})"
        )
        kernel = f["weight_kernels"]
        if kernel is not None:
            print(
                f"  its weight kernels alone stream {kernel['gbs_median']} GB/s, {kernel['bandwidth_fraction_median']:.0%} of the read bandwidth "
                f"(rounds: {kernel['bandwidth_fraction_range'][0]:.0%}–{kernel['bandwidth_fraction_range'][1]:.0%}); "
                f"the whole step reaches {kernel['step_fraction_median']:.0%} of that rate"
            )
    print(f"read bandwidth {figures['bandwidth_gbs_median']} GB/s (rounds: {figures['bandwidth_gbs_range'][0]}–{figures['bandwidth_gbs_range'][1]})")
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


def _kernel_figures(rates: list[float], bandwidths: list[float], step_rates: np.ndarray) -> dict[str, object] | None:
    """The weight kernels' streaming rate, against each round's bandwidth, and the share of it
    the whole step reaches."""
    if not rates:
        return None
    against_bandwidth = np.array(rates) / np.array(bandwidths)
    return {
        "gbs_median": round(float(np.median(rates)) / 1e9, 1),
        "bandwidth_fraction_median": significant(float(np.median(against_bandwidth))),
        "bandwidth_fraction_range": [significant(float(against_bandwidth.min())), significant(float(against_bandwidth.max()))],
        "step_fraction_median": significant(float(np.median(step_rates / np.array(rates)))),
    }


if __name__ == "__main__":
    sys.exit(main())
