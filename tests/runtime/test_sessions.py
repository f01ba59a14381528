"""Provider selection and CUDA provider options, checked without a GPU."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from runtime.errors import ProviderError
from runtime.sessions import cuda_provider_options, provider_list, resolve_providers

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
