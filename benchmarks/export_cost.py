"""What an export costs: wall time and peak RSS of `lalm-export` on a base-sized encoder
(random weights from the default config, e.g. wav2vec2-base: 95 M parameters), with the
parity gate on. The export runs in a child process, so its peak RSS is its own."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_base_checkpoint(family: str, folder: Path) -> int:
    """Save a randomly initialised base-sized model (the base preset's); returns its parameter count."""
    from safetensors import safe_open

    from benchmarks.presets import base_config
    from lalm_export.demo.tiny import save_random_checkpoint

    save_random_checkpoint(family, folder, base_config(family), seed=0)
    with safe_open(str(folder / "model.safetensors"), framework="np") as weights:
        return sum(int(np.prod(weights.get_slice(name).get_shape())) for name in weights.keys())


def measure_export(family: str, work: Path) -> dict:
    checkpoint = work / "checkpoint"
    params = build_base_checkpoint(family, checkpoint)
    command = [sys.executable, "-m", "lalm_export.cli", "--encoder", family, "--model", str(checkpoint), "--output", str(work / "bundle"), "-q"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"export failed: {result.stderr.strip()}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, largest child
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    return {
        "family": family,
        "parameters": params,
        "command": " ".join(["lalm-export", *command[3:]]),
        "wall_seconds": round(seconds, 2),
        "peak_rss_gib": round(peak_kib / 2**20, 3),
        "parity": manifest["parity"]["outputs"],
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "libraries": manifest["libraries"],
    }


def run(family: str, out: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="lalm-export-cost-") as tmp:
        figures = measure_export(family, Path(tmp))
    text = json.dumps(figures, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return figures
