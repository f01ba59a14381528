"""How close a decoder bundle's decode step comes to its memory-bandwidth floor.

    python -m benchmarks.decode_floor BUNDLE [BUNDLE ...] [--rounds 5] [--steps 32]

The floor is the weight bytes a step reads over the machine's read bandwidth. On a shared
VM that bandwidth moves by almost 2x from one minute to the next, so it is measured in
every round, interleaved with the bundles' decode steps, and each round's steps are held
against that round's bandwidth. Prints one line per bundle and, with --json, the figures."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import memory_read_gbs
from benchmarks.run import weight_bytes_per_token
from runtime.api import load
from runtime.manifest import read_manifest


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="decoder bundles written by lalm-export")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per bundle and round (default: 32)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    backends, weights, vocab = {}, {}, 32_000
    for bundle in args.bundles:
        manifest = read_manifest(bundle)
        if manifest.role != "decoder":
            print(f"decode_floor: error: {bundle} is a {manifest.role} bundle; pass decoder bundles", file=sys.stderr)
            return 1
        backends[str(bundle)] = load(bundle).backend
        vocab = min(vocab, int(manifest.extra.get("vocab_size", vocab)))
        weights[str(bundle)] = weight_bytes_per_token(bundle / manifest.graphs["model"].path)
    prompt = np.random.default_rng(0).integers(3, vocab, size=(1, args.prompt))
    fractions: dict[str, list[float]] = {name: [] for name in backends}
    steps: dict[str, list[float]] = {name: [] for name in backends}
    bandwidths = []
    for _ in range(args.rounds):
        bandwidth = memory_read_gbs() * 1e9
        bandwidths.append(bandwidth)
        for name, backend in backends.items():
            seconds = decode_step_seconds(backend, prompt, args.steps)
            steps[name].append(seconds)
            fractions[name].append(weights[name] / bandwidth / seconds)
    figures = {
        "torch_threads": torch.get_num_threads(),
        "bandwidth_gbs_median": round(float(np.median(bandwidths)) / 1e9, 1),
        "bandwidth_gbs_range": [round(min(bandwidths) / 1e9, 1), round(max(bandwidths) / 1e9, 1)],
        "bundles": {
            name: {
                "weights_mb_per_token": round(weights[name] / 1e6, 1),
                "step_ms_median": round(float(np.median(steps[name])) * 1e3, 2),
                "floor_fraction_median": round(float(np.median(fractions[name])), 3),
                "floor_fraction_range": [round(min(fractions[name]), 3), round(max(fractions[name]), 3)],
            }
            for name in backends
        },
    }
    for name, f in figures["bundles"].items():
        print(
            f"{name}: step {f['step_ms_median']} ms, {f['weights_mb_per_token']} MB/token, "
            f"{f['floor_fraction_median']:.0%} of the bandwidth floor (rounds: {f['floor_fraction_range'][0]:.0%}–{f['floor_fraction_range'][1]:.0%})"
        )
    print(f"read bandwidth {figures['bandwidth_gbs_median']} GB/s (rounds: {figures['bandwidth_gbs_range'][0]}–{figures['bandwidth_gbs_range'][1]})")
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
