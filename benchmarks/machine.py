"""What the machine is, and what it can do at most: the ceilings each result is held against."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.cpu import describe_cpu, has_bf16, isa_label


def report_header(command: str) -> dict[str, Any]:
    """What every benchmark's results open with: when they were made, the command that made
    them, the machine and the libraries that ran."""
    import datetime as dt

    from lalm_export.export.manifest import library_versions

    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return {"created": created, "command": command, "machine": describe_machine(), "libraries": library_versions()}


def describe_machine() -> dict[str, Any]:
    """The machine a result was measured on: results compare only with results of the same `isa`."""
    cpu = describe_cpu()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
        "isa": isa_label(),
        "int8_kernels": cpu["int8_kernels"],
        # LALM_CPU_FLAGS: the flags were given, as under benchmarks/cpu_mask/as_avx2.sh (CPUID masked)
        **({"cpu_flags_from": cpu["flags_from"]} if "flags_from" in cpu else {}),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_gib, 1),
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def _best_seconds(fn, repeats: int = 5, device: str = "cpu") -> float:
    def call() -> None:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_gflops(dtype: torch.dtype, size: int = 2048, device: str = "cpu") -> float:
    """Dense matmul rate of PyTorch (CPU fp32: oneDNN/MKL; bf16: AMX where present; CUDA: cuBLAS)."""
    size = 8192 if device == "cuda" else size
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / _best_seconds(lambda: torch.matmul(a, b), device=device) / 1e9


def ort_matmul_gops(int8: bool, m: int = 512, k: int = 768, n: int = 3072) -> float:
    """ONNX Runtime's CPU MatMul on a transformer-sized shape: fp32 (MLAS SGEMM) or the int8
    variants' kernel (dynamic U8S8, this machine's recipe)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from lalm_export.precision.transforms import int8_recipe, quantize_int8

    weight = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(source))
        if int8:
            quantize_int8(source, target, int8_recipe("auto"))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(target if int8 else source), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    return 2 * m * k * n / _best_seconds(lambda: session.run(None, {"x": x}), repeats=20) / 1e9


def memory_read_gbs(megabytes: int = 1024, device: str = "cpu") -> float:
    """Streaming read bandwidth, what decoding weights needs: a sum over a large tensor
    reads each byte once and writes almost nothing."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    seconds = _best_seconds(lambda: source.sum(), device=device)
    return source.numel() * 4 / seconds / 1e9


def measure_ceilings(device: str = "cpu") -> dict[str, float]:
    if device == "cuda":
        return {
            "fp32_gemm_gflops": round(gemm_gflops(torch.float32, device="cuda"), 1),
            "fp16_gemm_gflops": round(gemm_gflops(torch.float16, device="cuda"), 1),
            "memory_bandwidth_gbs": round(memory_read_gbs(2048, device="cuda"), 2),
        }
    return {
        # The best of PyTorch's and ONNX Runtime's fp32 GEMM: either may be the faster here.
        "fp32_gemm_gflops": round(max(gemm_gflops(torch.float32), ort_matmul_gops(int8=False)), 1),
        # Without bf16 instructions PyTorch emulates bf16 (AVX2: ~1 GFLOP/s): no ceiling to hold anything against.
        **({"bf16_gemm_gflops": round(gemm_gflops(torch.bfloat16), 1)} if has_bf16() else {}),
        "int8_gemm_gops": round(ort_matmul_gops(int8=True), 1),
        "memory_bandwidth_gbs": round(memory_read_gbs(), 2),
    }
