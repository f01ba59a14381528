"""How much memory one clip takes in an encoder bundle, by clip length: the figures behind
`runtime.limits.clip_memory_bytes`. A base-sized encoder (random weights, the base preset's
architecture) is exported once; each length then runs in a child process of its own
(`runtime.api`, as the server runs it), which reports its memory after a 1 s warm-up clip,
its peak (ru_maxrss) and its memory once the clip is done."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys
import numpy as np
from runtime.api import load
from runtime.sessions import SessionOptions

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

runner = load(sys.argv[1], SessionOptions(provider="cpu", max_clip_memory_gb=1e6))
clip = np.random.default_rng(0).standard_normal(int(float(sys.argv[2]) * 16000)).astype(np.float32) * 0.1
runner.encode_arrays([clip[:16000]])
warm = resident()
runner.encode_arrays([clip])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"warm_bytes": warm, "peak_bytes": peak, "after_bytes": resident()}))
"""


def measure(bundle: Path, seconds: float) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(seconds)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"clip-memory: the {seconds:g} s clip failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(family: str, seconds: list[float], out: Path | None) -> dict:
    from benchmarks.export_cost import build_base_checkpoint
    from runtime.limits import clip_memory_bytes, frame_samples
    from runtime.manifest import read_json_object

    with tempfile.TemporaryDirectory(prefix="clip-memory-") as work:
        checkpoint, bundle = Path(work) / "checkpoint", Path(work) / "bundle"
        build_base_checkpoint(family, checkpoint)
        command = [sys.executable, "-m", "lalm_export.cli", "--encoder", family, "--model", str(checkpoint), "--output", str(bundle), "-q"]
        exported = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if exported.returncode != 0:
            raise SystemExit(f"clip-memory: export failed: {exported.stderr.strip()}")
        config = read_json_object(bundle / "config.json", "bundle file")
        heads, hidden, stride = config["num_attention_heads"], config["hidden_size"], frame_samples(config)
        rows = []
        for length in seconds:
            figures = measure(bundle, length)
            frames = int(length * 16_000) // stride
            row = {
                "seconds": length,
                "frames": frames,
                "peak_above_session_gb": round((figures["peak_bytes"] - figures["warm_bytes"]) / 1e9, 3),
                "kept_after_gb": round((figures["after_bytes"] - figures["warm_bytes"]) / 1e9, 3),
                "bound_gb": round(clip_memory_bytes(frames, heads, hidden) / 1e9, 3),
            }
            rows.append(row)
            print(
                f"{length:6g} s  {frames:6d} frames  peak +{row['peak_above_session_gb']:.2f} GB  kept +{row['kept_after_gb']:.2f} GB  "
                f"bound {row['bound_gb']:.2f} GB",
                file=sys.stderr,
            )
    report = {
        "family": family,
        "architecture": {"num_attention_heads": heads, "hidden_size": hidden, "frame_samples": stride},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "command": f"python -m benchmarks clip-memory --family {family} --seconds {' '.join(f'{s:g}' for s in seconds)}",
        "rows": rows,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
