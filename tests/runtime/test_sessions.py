"""Provider selection and CUDA provider options, checked without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import onnxruntime as ort
import pytest

from runtime.errors import ProviderError
from runtime.sessions import cuda_provider_options, provider_list, resolve_providers
from tests.helpers import SUBPROCESS_TIMEOUT_S

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.mark.parametrize(
    ("available", "choice", "expected"),
    [
        ([CUDA, CPU], "auto", [CUDA, CPU]),
        ([CPU], "auto", [CPU]),
        ([CUDA, CPU], "cpu", [CPU]),
        ([CUDA, CPU], "cuda", [CUDA, CPU]),
    ],
)
def test_provider_choice(monkeypatch, available, choice, expected):
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    assert resolve_providers(choice) == expected


def test_cuda_where_it_is_missing_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(ProviderError, match="install onnxruntime-gpu"):
        resolve_providers("cuda")


def test_cuda_provider_gets_its_options_and_cpu_none():
    providers = provider_list([CUDA, CPU])
    assert providers[1] == CPU
    name, options = providers[0]
    assert name == CUDA and options == cuda_provider_options()
    assert options["use_tf32"] == "0", "TF32 would break fp32 parity"
    assert options["arena_extend_strategy"] == "kSameAsRequested"


def test_cudnn_conv_algo_search_can_be_chosen_and_a_typo_is_refused(monkeypatch):
    monkeypatch.delenv("LALM_CUDNN_CONV_ALGO_SEARCH", raising=False)
    assert cuda_provider_options()["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    monkeypatch.setenv("LALM_CUDNN_CONV_ALGO_SEARCH", "heuristic")
    assert cuda_provider_options()["cudnn_conv_algo_search"] == "HEURISTIC"
    monkeypatch.setenv("LALM_CUDNN_CONV_ALGO_SEARCH", "FASTEST")
    with pytest.raises(ProviderError, match="EXHAUSTIVE, HEURISTIC, DEFAULT"):
        cuda_provider_options()


@pytest.mark.parametrize("provider, disabled", [("cuda", True), ("auto", False)])
def test_a_cuda_session_never_falls_back_to_the_cpu_silently(monkeypatch, provider, disabled):
    from runtime import sessions

    class FakeSession:
        def __init__(self, *args, **kwargs):
            self.fallback = True

        def disable_fallback(self):
            self.fallback = False

    monkeypatch.setattr(sessions.ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(sessions, "resolve_providers", lambda choice: [CUDA, CPU])
    monkeypatch.setattr(sessions, "preload_cuda_libraries", lambda: None)
    session = sessions.create_session("model.onnx", sessions.SessionOptions(provider=provider))
    assert session.fallback is not disabled


def test_cuda_libraries_are_preloaded_only_for_cuda_sessions(monkeypatch, tmp_path):
    import numpy as np
    import onnx
    from onnx import helper

    from runtime import sessions

    calls = []
    monkeypatch.setattr(sessions, "preload_cuda_libraries", lambda: calls.append(1))
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    session = sessions.create_session(path, sessions.SessionOptions(provider="cpu"))
    assert session.run(None, {"x": np.array([-1.0, 1.0], dtype=np.float32)})[0].tolist() == [0.0, 1.0]
    assert calls == []


IDLE_CPU_PROBE = """
import resource, sys, time
import numpy as np, onnx
from onnx import helper, numpy_helper
from runtime.sessions import SessionOptions, create_session

weight = numpy_helper.from_array(np.ones((512, 512), np.float32), "w")
graph = helper.make_graph(
    [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [512, 512])],
    [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [512, 512])], [weight])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), sys.argv[1])
session = create_session(sys.argv[1], SessionOptions(provider="cpu", threads=2))
x = np.ones((512, 512), np.float32)
idle = []
for _ in range(3):
    session.run(None, {"x": x})
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    idle.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
print(max(idle))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: ONNX Runtime starts no worker thread to spin")
def test_a_session_leaves_the_cores_alone_between_runs(tmp_path):
    """ONNX Runtime's worker threads spin after each run by default (35 ms of CPU a run here),
    taking the cores from the next graph of a bundle or from eager PyTorch; sessions made by the
    runtime let them sleep between runs. Measured as this process's CPU time while it sleeps
    after a run (a fresh process: no other session's threads), not as a duration."""
    probe = subprocess.run(
        [sys.executable, "-c", IDLE_CPU_PROBE, str(tmp_path / "g.onnx")], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=True
    )
    assert float(probe.stdout) < 0.005, f"{float(probe.stdout) * 1000:.1f} ms of CPU burned while idle after a run"
