"""Which cuDNN plan search runs wav2vec2/HuBERT's positional convolution on this GPU.

ONNX Runtime's CUDA Conv asks cuDNN for plans with one heuristic mode (set by
`cudnn_conv_algo_search`) and fails when that mode finds none. On an H100 (cuDNN 9.14 and
9.19), HEURISTIC (mode A) found no fp16 plan for the 128-tap grouped convolution. This runs
that convolution, fp16 and fp32, at the lengths the benchmark uses, under each search mode on
the GPU (sessions never fall back to the CPU: `runtime.sessions.create_session`), times it,
writes the table as JSON and prints the first mode, in `CONV_ALGO_SEARCHES`' order of
preference, that ran every case (run.sh exports it as LALM_CUDNN_CONV_ALGO_SEARCH).

    python benchmarks/gpu/conv_probe.py --provider cuda --out conv_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.sessions import CONV_ALGO_SEARCH_ENV, CONV_ALGO_SEARCHES, SessionOptions, active_provider, create_session

CHANNELS, GROUPS, TAPS = 768, 16, 128  # wav2vec2-base / HuBERT-base pos_conv_embed
CASES = ((1, 49), (1, 499), (8, 499))  # (batch, frames): 1 s and 10 s of audio
DTYPES = {"fp16": (np.float16, TensorProto.FLOAT16), "fp32": (np.float32, TensorProto.FLOAT)}


def positional_conv(path: Path, dtype: str) -> None:
    numpy_type, onnx_type = DTYPES[dtype]
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((CHANNELS, CHANNELS // GROUPS, TAPS)) * 0.02).astype(numpy_type)
    bias = np.zeros(CHANNELS, dtype=numpy_type)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=GROUPS, kernel_shape=[TAPS], pads=[TAPS // 2, TAPS // 2])
    graph = helper.make_graph(
        [node],
        "pos_conv",
        [helper.make_tensor_value_info("x", onnx_type, ["batch", CHANNELS, "frames"])],
        [helper.make_tensor_value_info("y", onnx_type, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)


def median_ms(session, x: np.ndarray, repeats: int = 10) -> float:
    session.run(None, {"x": x})  # plan creation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def probe(provider: str, folder: Path) -> list[dict]:
    rows = []
    for mode in CONV_ALGO_SEARCHES if provider == "cuda" else CONV_ALGO_SEARCHES[:1]:  # the CPU has no cuDNN
        os.environ[CONV_ALGO_SEARCH_ENV] = mode
        for dtype, (numpy_type, _) in DTYPES.items():
            graph = folder / f"pos_conv_{dtype}.onnx"
            positional_conv(graph, dtype)
            session = create_session(graph, SessionOptions(provider=provider))
            for batch, frames in CASES:
                x = np.random.default_rng(1).standard_normal((batch, CHANNELS, frames)).astype(numpy_type)
                row = {"search": mode, "dtype": dtype, "batch": batch, "frames": frames}
                try:
                    row["median_ms"] = median_ms(session, x)
                except Exception as err:  # noqa: BLE001 - a failed plan is the finding
                    row["error"] = str(err).splitlines()[0][:300]
                if active_provider(session) != provider:
                    row["error"] = f"ran on {active_provider(session)}, not {provider}"
                rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="cpu only checks the wiring")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = probe(args.provider, Path(tmp))
    working = [m for m in CONV_ALGO_SEARCHES if all("error" not in r for r in rows if r["search"] == m)]
    chosen = working[0] if working else CONV_ALGO_SEARCHES[0]
    args.out.write_text(json.dumps({"provider": args.provider, "rows": rows, "working": working, "chosen": chosen}, indent=2) + "\n")
    for row in rows:
        outcome = f"{row['median_ms']} ms" if "median_ms" in row else f"FAILED: {row['error'][:120]}"
        print(f"   {row['search']:<10} {row['dtype']} batch {row['batch']} x {row['frames']} frames: {outcome}", file=sys.stderr)
    print(chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
