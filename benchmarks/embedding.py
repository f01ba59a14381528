"""`python -m benchmarks.embedding`: an LALM generation's embeddings looked up on the host (the
bundle's `embed_tokens.npy` with numpy, what the runtime does) against an in-graph embedding
(an ONNX graph: Gather on the token table, the audio frames concatenated at the placeholder),
on a token table of a real decoder's size: the prompt once, then one token per decode step.
Medians of interleaved runs after warm-up."""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def embedding_graph(table: np.ndarray, path: Path) -> None:
    """ids before the placeholder, the audio frames, ids after → inputs_embeds (1, positions, hidden);
    and `step_ids` → `step_embeds` (1, 1, hidden), a decode step's token."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = table.shape[1]
    nodes = [
        helper.make_node("Gather", ["table", "step_ids"], ["step_flat"], axis=0),
        helper.make_node("Unsqueeze", ["step_flat", "zero"], ["step_embeds"]),
        helper.make_node("Gather", ["table", "ids_before"], ["before"], axis=0),
        helper.make_node("Gather", ["table", "ids_after"], ["after"], axis=0),
        helper.make_node("Concat", ["before", "audio_features", "after"], ["flat"], axis=0),
        helper.make_node("Unsqueeze", ["flat", "zero"], ["inputs_embeds"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [
            helper.make_tensor_value_info("ids_before", TensorProto.INT64, ["b"]),
            helper.make_tensor_value_info("audio_features", TensorProto.FLOAT, ["frames", hidden]),
            helper.make_tensor_value_info("ids_after", TensorProto.INT64, ["a"]),
            helper.make_tensor_value_info("step_ids", TensorProto.INT64, [1]),
        ],
        [
            helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, "positions", hidden]),
            helper.make_tensor_value_info("step_embeds", TensorProto.FLOAT, [1, 1, hidden]),
        ],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([0], dtype=np.int64), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")


def run(vocab: int, hidden: int, frames: int, prompt_tokens: int, repeats: int, new_tokens: int = 32) -> dict[str, Any]:
    import onnxruntime as ort

    from runtime.runners.lalm import prompt_embeddings

    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, hidden), dtype=np.float32)
    audio = rng.standard_normal((frames, hidden), dtype=np.float32)
    ids = [int(i) for i in rng.integers(0, vocab, prompt_tokens)]
    placeholder = vocab  # an id the table does not hold: only its position matters
    prompt = ids[:2] + [placeholder] + ids[2:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embedding.onnx"
        embedding_graph(table, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {"ids_before": np.array(prompt[:2], dtype=np.int64), "audio_features": audio, "ids_after": np.array(prompt[3:], dtype=np.int64)}
        step = np.array([ids[0]], dtype=np.int64)
        # A generation looks up its prompt once, then one token per decode step.
        runners = {
            "prompt, host table (numpy)": lambda: prompt_embeddings(prompt, placeholder, table, audio)[None],
            "prompt, in-graph (ONNX Runtime)": lambda: session.run(["inputs_embeds"], {**feeds, "step_ids": step})[0],
            "decode step, host table (numpy)": lambda: table[step][None],
            "decode step, in-graph (ONNX Runtime)": lambda: session.run(["step_embeds"], {**feeds, "step_ids": step})[0],
        }
        assert np.array_equal(runners["prompt, host table (numpy)"](), runners["prompt, in-graph (ONNX Runtime)"]()), "the prompt embeddings differ"
        assert np.array_equal(runners["decode step, host table (numpy)"](), runners["decode step, in-graph (ONNX Runtime)"]()), "the step embeddings differ"
        times: dict[str, list[float]] = {name: [] for name in runners}
        for round_index in range(repeats + 5):
            for name, fn in runners.items():
                start = time.perf_counter()
                fn()
                if round_index >= 5:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1e6 for name, values in times.items()}
    per_generation = {
        kind: medians[f"prompt, {kind}"] + (new_tokens - 1) * medians[f"decode step, {kind}"] for kind in ("host table (numpy)", "in-graph (ONNX Runtime)")
    }
    return {
        "settings": {"vocab": vocab, "hidden": hidden, "audio_frames": frames, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats},
        "median_us": {name: round(value, 1) for name, value in medians.items()},
        "per_generation_us": {kind: round(value, 1) for kind, value in per_generation.items()},
        "faster": min(per_generation, key=per_generation.get),
        "identical": True,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from benchmarks.machine import describe_machine

    parser = argparse.ArgumentParser(prog="python -m benchmarks.embedding", description=__doc__)
    parser.add_argument("--vocab", type=int, default=151_936, help="token table rows (default: Qwen2.5's 151,936)")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size (default: Qwen2.5-0.5B's 896)")
    parser.add_argument("--frames", type=int, default=125, help="projected audio frames (default: 125, 10 s of Whisper audio downsampled by 4)")
    parser.add_argument("--prompt-tokens", type=int, default=12, help="prompt tokens besides the placeholder (default: 12)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per generation: the prompt's lookup, then one per decode step (default: 32)")
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="also write the JSON figures to this file")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    results = {"command": "python -m benchmarks.embedding " + shlex.join(argv), "machine": describe_machine()}
    results.update(run(args.vocab, args.hidden, args.frames, args.prompt_tokens, args.repeats, args.new_tokens))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
