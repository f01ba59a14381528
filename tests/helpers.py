"""Helpers shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
# Bundles written by lalm-export on transformers 4.57.6 (commit fff5f73): the format kept since.
OLD_BUNDLES = REPO / "tests" / "data" / "bundles-transformers-4.57"
# A hang guard, never a time limit on work: a loaded 2-core machine must not trip it.
SUBPROCESS_TIMEOUT_S = 900


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """LoRA starts with B = 0 (no effect); give B values so a wrong merge shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def relative_error(reference: np.ndarray | torch.Tensor, candidate: np.ndarray | torch.Tensor) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    return float(np.max(np.abs(reference - candidate)) / np.max(np.abs(reference)))


def run_cli(
    *args: str, env: dict[str, str] | None = None, module: str = "lalm_export.cli", timeout: float = SUBPROCESS_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run a command-line entry point as a user would, in a subprocess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout)


@dataclass(frozen=True)
class Outcome:
    """What a command-line run gave: exit status and its two streams."""

    returncode: int
    stdout: str
    stderr: str


def run_main(main: Callable[[list[str]], int], *args: object, capsys: pytest.CaptureFixture[str]) -> Outcome:
    """Run a command's `main(argv)` in this process (argparse's exit 2 included), capturing
    its output: user-error cases stay fast; each command keeps one subprocess test too."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def assert_user_error(result: subprocess.CompletedProcess | Outcome, fragment: str) -> None:
    """Non-zero exit, no traceback, one line on stderr naming the problem."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    assert fragment in error_lines[0], error_lines[0]


def run_encoder(bundle: Path, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every output of an encoder bundle's graph for input `x`, through a plain CPU session."""
    import onnxruntime as ort

    from runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    session = ort.InferenceSession(str(bundle / manifest.graphs["model"].path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: x.numpy()})))


def deny(monkeypatch: pytest.MonkeyPatch, *roots: Path) -> None:
    """Paths at or under `roots` answer as for a user who may not search a folder above them
    (stat raises EACCES, access says no). The suite runs as root, whom no permission stops."""
    real_stat, real_access = os.stat, os.access
    roots = tuple(Path(r).absolute() for r in roots)

    def blocked(path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and any(Path(os.fspath(path)).absolute().is_relative_to(r) for r in roots)

    def stat(path, *args, **kwargs):
        if blocked(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: not blocked(path) and real_access(path, mode, *a, **k))


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    """Change a JSON file in place, as a hand edit would (a damaged bundle's manifest or config)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
