"""How much memory one clip takes in an encoder bundle, by clip length: the figures behind
`runtime.limits.clip_memory_bytes`. A base-sized encoder (random weights, the base preset's
architecture) is exported once; each length then runs in a child process of its own
(`runtime.api`, as the server runs it), which reports its memory after a 1 s warm-up clip,
its peak while the clip runs and its memory once the clip is done (Linux's /proc), with the
runtime's arena shrinking and, for comparison, with ONNX Runtime's default arena."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The peak is the clip's own: Linux's peak resident size (VmHWM) is reset after the warm-up
# (clear_refs 5), so session creation's peak does not count.
CHILD = """
import json, sys
import numpy as np
from runtime.api import load
from runtime.sessions import SessionOptions

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

runner = load(sys.argv[1], SessionOptions(provider="cpu", max_clip_memory_gb=1e6))
if sys.argv[3] == "default-arena":  # as before the runtime shrank the arena after long runs
    import runtime.runners.encoder
    runtime.runners.encoder.run_options_for = lambda kind, samples: None
clip = np.random.default_rng(0).standard_normal(int(float(sys.argv[2]) * 16000)).astype(np.float32) * 0.1
runner.encode_arrays([clip[:16000]])
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
warm = status("VmRSS")
runner.encode_arrays([clip])
print(json.dumps({"warm_bytes": warm, "peak_bytes": status("VmHWM"), "after_bytes": status("VmRSS")}))
"""


def measure(bundle: Path, seconds: float, arena: str) -> dict:
    command = [sys.executable, "-c", CHILD, str(bundle), str(seconds), arena]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"clip-memory: the {seconds:g} s clip failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(family: str, seconds: list[float], out: Path | None) -> dict:
    from benchmarks.export_cost import build_base_checkpoint
    from benchmarks.machine import describe_machine
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
            figures, default = measure(bundle, length, "shrunk"), measure(bundle, length, "default-arena")
            frames = int(length * 16_000) // stride
            row = {
                "seconds": length,
                "frames": frames,
                "peak_above_session_gb": round((figures["peak_bytes"] - figures["warm_bytes"]) / 1e9, 3),
                "kept_after_gb": round((figures["after_bytes"] - figures["warm_bytes"]) / 1e9, 3),
                "kept_after_with_default_arena_gb": round((default["after_bytes"] - default["warm_bytes"]) / 1e9, 3),
                "bound_gb": round(clip_memory_bytes(frames, heads, hidden) / 1e9, 3),
            }
            rows.append(row)
            print(
                f"{length:6g} s  {frames:6d} frames  peak +{row['peak_above_session_gb']:.2f} GB  kept +{row['kept_after_gb']:.2f} GB "
                f"(default arena +{row['kept_after_with_default_arena_gb']:.2f} GB)  "
                f"bound {row['bound_gb']:.2f} GB",
                file=sys.stderr,
            )
    report = {
        "family": family,
        "architecture": {"num_attention_heads": heads, "hidden_size": hidden, "frame_samples": stride},
        "machine": describe_machine(),
        "command": f"python -m benchmarks clip-memory --family {family} --seconds {' '.join(f'{s:g}' for s in seconds)}",
        "rows": rows,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
