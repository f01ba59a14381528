"""`lalm-export` given what a careless or hostile user gives: a wrong result is never
accepted, and each case ends with one line naming what is wrong and what to do, exit 1
(2 for bad flags), no traceback and nothing written. In process, through `main(argv)`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lalm_export.cli import main
from lalm_export.demo.tiny import build_tiny_checkpoint
from lalm_export.errors import OutputExistsError, OutputPathError
from lalm_export.io import PARTIAL_MARK, atomic_folder
from lalm_export.models import HubertAudioEncoder
from tests.helpers import REPO, SUBPROCESS_TIMEOUT_S, assert_user_error, randomize_lora, run_main


@pytest.fixture(scope="module")
def inputs(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Broken inputs of every kind, built once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    nan_weights = root / "nan-weights"
    HubertAudioEncoder(str(checkpoints["hubert"]), finetune=True).save_model_weights(nan_weights)
    tensors = load_file(str(nan_weights / "model.safetensors"))
    key = next(k for k in tensors if "layers.0.attention.q_proj.weight" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(nan_weights / "model.safetensors"))

    incomplete = build_tiny_checkpoint("hubert", root / "incomplete")
    tensors = load_file(str(incomplete / "model.safetensors"))
    del tensors[next(k for k in tensors if k.endswith("layers.1.feed_forward.output_dense.weight"))]
    save_file(tensors, str(incomplete / "model.safetensors"), metadata={"format": "pt"})

    adapter = HubertAudioEncoder(str(checkpoints["hubert"]), use_lora=True)
    randomize_lora(adapter)
    for name, change in (("empty-config", lambda c: {}), ("edited-alpha", lambda c: {**c, "lora_alpha": 64})):
        adapter.save_lora_weights(root / name)
        config = json.loads((root / name / "adapter_config.json").read_text())
        (root / name / "adapter_config.json").write_text(json.dumps(change(config)))
    (root / "a-file").write_text("not a folder")
    users = root / "users-folder"
    users.mkdir()
    (users / "thesis.txt").write_text("mine")
    return {
        "nan-weights": nan_weights,
        "incomplete": incomplete,
        "empty-config": root / "empty-config",
        "edited-alpha": root / "edited-alpha",
        "a-file": root / "a-file",
        "users-folder": users,
    }


HUBERT = ["--encoder", "hubert", "--model", "CKPT:hubert"]

# case: (argv, expected fragment, exit status)
CASES = {
    "NaN in the weights": ([*HUBERT, "--weights", "IN:nan-weights"], "NaN or inf", 1),
    "checkpoint of another family": (["--encoder", "wav2vec2", "--model", "CKPT:llm"], "is a 'llama' checkpoint, not a wav2vec2 one; pass --decoder auto", 1),
    "encoder checkpoint as the wrong encoder": (["--encoder", "wav2vec2", "--model", "CKPT:hubert"], "pass --encoder hubert", 1),
    "checkpoint that lacks a weight": (["--encoder", "hubert", "--model", "IN:incomplete"], "lacks 1 weight(s)", 1),
    "adapter config without r and alpha": ([*HUBERT, "--adapter", "IN:empty-config"], "lacks r and lora_alpha", 1),
    "adapter config edited after saving": ([*HUBERT, "--adapter", "IN:edited-alpha"], "lora_alpha=64", 1),
    "adapter path is a file": ([*HUBERT, "--adapter", "IN:a-file"], "is a file", 1),
    "model path is a file": (["--encoder", "hubert", "--model", "IN:a-file"], "is a file", 1),
    "calibration is a folder": (
        ["--decoder", "auto", "--model", "CKPT:llm", "--precision", "int4", "--int4-method", "gptq", "--calibration", "IN:users-folder"],
        "is a folder",
        1,
    ),
    "atol NaN": ([*HUBERT, "--atol", "nan"], "not a finite number", 2),
    "rtol NaN": ([*HUBERT, "--rtol", "nan"], "not a finite number", 2),
    "rtol infinite": ([*HUBERT, "--rtol", "inf"], "not a finite number", 2),
    "min-cosine NaN": ([*HUBERT, "--precision", "int8", "--min-cosine", "nan"], "not a finite number", 2),
    "output under a file": ([*HUBERT, "--output", "IN:a-file/bundle"], "is a file, not a folder", 1),
    "force over a folder of the user's files": ([*HUBERT, "--output", "IN:users-folder", "--force"], "not a bundle", 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, inputs, checkpoints, tmp_path, capsys):
    argv, fragment, status = CASES[case]

    def resolve(arg: str) -> str:
        kind, _, name = arg.partition(":")
        if kind == "CKPT":
            return str(checkpoints[name])
        if kind == "IN":
            first, _, rest = name.partition("/")
            return str(inputs[first] / rest) if rest else str(inputs[first])
        return arg

    args = [resolve(a) for a in argv]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out" / "bundle")]
    watched = [tmp_path, inputs["users-folder"], inputs["a-file"].parent]
    before = {p: sorted(p.rglob("*")) for p in watched}
    result = run_main(main, *args, capsys=capsys)
    assert_user_error(result, fragment)
    assert result.returncode == status
    assert {p: sorted(p.rglob("*")) for p in watched} == before, "something was written or removed"


def test_parity_failure_removes_the_folders_it_made(checkpoints, tmp_path, capsys):
    output = tmp_path / "made" / "for" / "bundle"
    result = run_main(main, *["--encoder", "hubert", "--model", checkpoints["hubert"], "--rtol", "1e-15", "--output", output], capsys=capsys)
    assert_user_error(result, "disagrees with eager PyTorch fp32")
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_folders_of_dead_exports_are_removed(tmp_path):
    target = tmp_path / "bundle"
    dead = tmp_path / ".bundle.partial-999999999-abc"  # no such process
    alive = tmp_path / f".bundle.partial-{os.getpid()}-def"  # a running export's
    other = tmp_path / ".bundle.partial-notes"  # not ours: no pid
    users = tmp_path / ".bundle.partial-999999998-mine"  # named like ours, of a dead pid, but without our mark
    for folder in (dead, alive, other, users):
        folder.mkdir()
    for folder in (dead, alive):
        (folder / PARTIAL_MARK).touch()
    (users / "notes.txt").write_text("mine")
    with atomic_folder(target, replace=False) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not dead.exists() and alive.exists() and other.exists() and (users / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json"]  # the mark does not go into the bundle


def test_the_loser_of_two_exports_to_one_output_is_a_clear_error(tmp_path):
    target = tmp_path / "bundle"
    with pytest.raises(OutputExistsError, match="written by another process"):
        with atomic_folder(target, replace=False) as tmp:
            (tmp / "manifest.json").write_text("{}")
            target.mkdir()  # the other export finished first
            (target / "manifest.json").write_text('{"theirs": true}')
    assert json.loads((target / "manifest.json").read_text()) == {"theirs": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_no_permission_is_not_reported_as_a_missing_file(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputPathError, match="no permission to write"):
        with atomic_folder(tmp_path / "new" / "bundle", replace=False):
            pass
    assert list(tmp_path.iterdir()) == []


def test_unreadable_model_folder_says_permission(checkpoints, tmp_path, monkeypatch, capsys):
    # Tests run as root here, which reads any folder: the check is driven through os.access.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != Path(checkpoints["hubert"]))
    result = run_main(main, *["--encoder", "hubert", "--model", checkpoints["hubert"], "--output", tmp_path / "b"], capsys=capsys)
    assert_user_error(result, "permission denied")
    assert "does not exist" not in result.stderr and "no config.json" not in result.stderr


def test_sigterm_during_an_export_leaves_nothing(checkpoints, tmp_path):
    output = tmp_path / "deep" / "bundle"
    command = [sys.executable, "-m", "lalm_export.cli", "--encoder", "hubert", "--model", str(checkpoints["hubert"]), "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not list(output.parent.glob(".bundle.partial-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert list(output.parent.glob(".bundle.partial-*")), "the export never started writing"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "terminated; no bundle was written" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("side", ["eager", "onnx"])
def test_nan_on_either_side_fails_the_gate_and_names_the_output(side):
    import numpy as np

    from lalm_export.errors import ParityError
    from lalm_export.parity.report import ParityReport, Tolerance

    clean = np.ones((1, 4, 8), dtype=np.float32)
    broken = clean.copy()
    broken[0, 2, 3] = np.nan
    report = ParityReport(Tolerance())
    report.record("last_hidden_state", broken if side == "eager" else clean, broken if side == "onnx" else clean)
    report.record("hidden_states.0", clean, clean)
    assert not report.passed
    with pytest.raises(ParityError, match=r"last_hidden_state: NaN or inf values \(1 in (eager PyTorch|ONNX Runtime)\) FAIL"):
        report.raise_if_failed()
    assert report.outputs["hidden_states.0"].passes(report.tolerance)
