"""ONNX Runtime sessions: provider choice and session options from one typed object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort

from runtime.errors import BundleError, ProviderError, RuntimeUserError
from runtime.manifest import GraphFile

ProviderName = Literal["auto", "cuda", "cpu"]
_ORT_PROVIDER = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionOptions:
    provider: ProviderName = "auto"
    threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    optimization: str = "all"
    save_optimized: bool = False  # write `<graph>.optimized.onnx` beside the graph for faster later starts
    max_clip_memory_gb: float | None = None  # memory one audio clip may take in an encoder (None: runtime.limits' default)

    def validate(self) -> None:
        if self.provider not in ("auto", "cuda", "cpu"):
            raise ProviderError(f"provider must be auto, cuda or cpu, not {self.provider!r}")
        if self.threads < 0:
            raise ProviderError(f"threads must be 0 (default) or positive, not {self.threads}")
        cores = os.cpu_count() or 1
        if self.threads > cores:
            raise ProviderError(f"threads {self.threads}: this machine has {cores} cores; pass at most {cores} (0: ONNX Runtime's default)")
        if self.max_clip_memory_gb is not None and not 0 < self.max_clip_memory_gb < float("inf"):
            raise ProviderError(f"--max-clip-memory-gb must be a positive number of GB, not {self.max_clip_memory_gb}")
        if self.optimization not in _OPT_LEVELS:
            raise ProviderError(f"optimization must be one of {', '.join(_OPT_LEVELS)}, not {self.optimization!r}")


def resolve_providers(provider: ProviderName) -> list[str]:
    """ORT provider list for a choice; `cuda` where it is unavailable is an error, not a fallback."""
    available = ort.get_available_providers()
    if provider == "cpu":
        return [_ORT_PROVIDER["cpu"]]
    cuda_ready = _ORT_PROVIDER["cuda"] in available
    if provider == "cuda":
        if not cuda_ready:
            raise ProviderError(
                "--provider cuda: CUDAExecutionProvider is not available "
                f"(installed providers: {', '.join(available)}); install onnxruntime-gpu on a machine with a GPU, "
                "or use --provider cpu"
            )
        return [_ORT_PROVIDER["cuda"], _ORT_PROVIDER["cpu"]]
    return [_ORT_PROVIDER["cuda"], _ORT_PROVIDER["cpu"]] if cuda_ready else [_ORT_PROVIDER["cpu"]]


CONV_ALGO_SEARCH_ENV = "LALM_CUDNN_CONV_ALGO_SEARCH"
CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")  # in order of preference


def conv_algo_search() -> str:
    """cuDNN's convolution plan search, EXHAUSTIVE unless the environment variable
    LALM_CUDNN_CONV_ALGO_SEARCH names HEURISTIC or DEFAULT. With cuDNN 9, ONNX Runtime maps
    these to cuDNN heuristic modes B, A and the fallback engines, and tries no second mode when
    the first finds no plan. On an H100 (benchmarks/results/gpu/conv_probe.json, measured by
    benchmarks/gpu/conv_probe.py) mode A found no fp16 plan for wav2vec2/HuBERT's grouped
    positional convolution, mode B ran every case, and the fallback engines were slower."""
    choice = os.environ.get(CONV_ALGO_SEARCH_ENV, CONV_ALGO_SEARCHES[0]).strip().upper()
    if choice not in CONV_ALGO_SEARCHES:
        raise ProviderError(f"{CONV_ALGO_SEARCH_ENV}={choice!r}: use one of {', '.join(CONV_ALGO_SEARCHES)}")
    return choice


def cuda_provider_options() -> dict[str, str]:
    """CUDAExecutionProvider settings, each for a reason:
    - use_tf32 0: TF32 matmuls keep 10 mantissa bits, so fp32 graphs would miss the 1e-4 parity
      of eager fp32 (which `lalm_export.models.eager.full_fp32` also runs without TF32);
    - arena_extend_strategy kSameAsRequested: the memory arena grows by what is asked, not by
      doubling, so a 0.5B decoder does not reserve twice its size;
    - cudnn_conv_algo_search (see `conv_algo_search`): the cuDNN heuristic that finds a plan for
      every convolution of the supported encoders;
    - do_copy_in_default_stream 1: host-device copies ordered with the kernels."""
    return {
        "device_id": "0",
        "use_tf32": "0",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": conv_algo_search(),
        "do_copy_in_default_stream": "1",
    }


def provider_list(names: list[str]) -> list[str | tuple[str, dict[str, str]]]:
    """`resolve_providers` names with their provider options, as InferenceSession takes them."""
    return [(name, cuda_provider_options()) if name == _ORT_PROVIDER["cuda"] else name for name in names]


def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the `nvidia-*` pip packages (as PyTorch's wheels bring them)
    where they are not on the library path; onnxruntime-gpu >= 1.21 knows where to look.
    A system CUDA on the library path needs none of this, so a failure here is not an error."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except (OSError, RuntimeError, ValueError):
            pass


def create_session(graph: str | Path, options: SessionOptions | None = None) -> ort.InferenceSession:
    options = options or SessionOptions()
    options.validate()
    providers = resolve_providers(options.provider)
    if providers[0] == _ORT_PROVIDER["cuda"]:
        preload_cuda_libraries()
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = _OPT_LEVELS[options.optimization]
    session_options.log_severity_level = 3
    if options.threads:
        session_options.intra_op_num_threads = options.threads
    # ONNX Runtime's worker threads spin for about 35 ms of CPU after each run by default, taking
    # the cores from whatever runs next: the next graph of a bundle (an audio LLM's decoder after
    # its encoder), another bundle, eager PyTorch in a benchmark. Spinning still bridges the nodes
    # of one run; between runs the threads sleep. On 2 cores: the base audio LLM in int8 end to
    # end 710 -> 662 ms, one decoder alone unchanged (docs/performance-notes.md).
    session_options.add_session_config_entry("session.force_spinning_stop", "1")
    if options.save_optimized:
        session_options.optimized_model_filepath = str(Path(graph).with_suffix(".optimized.onnx"))
    session = ort.InferenceSession(str(graph), sess_options=session_options, providers=provider_list(providers))
    if options.provider == "cuda":
        # ORT's Python `run` otherwise answers a CUDA kernel failure (e.g. cuDNN finding no plan
        # for a convolution) by moving the session to the CPU and carrying on, which made an
        # fp16 parity check "on cuda" pass on the CPU. Asked for cuda, a failure is an error.
        session.disable_fallback()
    return session


# A run on more audio than this (raw-audio encoders) gives ONNX Runtime's CPU arena back after
# it. An encoder's memory grows with the square of a clip's frames (a 100 s clip through a
# wav2vec2-base graph peaks 5.2 GB above the session) and the arena otherwise keeps its peak for
# the life of the process (benchmarks/results/clip-memory.json: 0.7 GB kept instead of 5.2).
# Shorter runs keep the arena: reallocating it after every run cost a tiny Whisper audio LLM a
# third of its end-to-end speed (1.76x eager fp32 -> 1.15x, `make bench-ci`'s lalm rows, 2 cores of
# an AMD EPYC with AVX-512 VNNI/BF16). A
# log-mel window is fixed, so its arena never grows past one window's.
SHRINK_ABOVE_SAMPLES = 30 * 16_000


def run_options_for(input_kind: str, samples: int, shrink: bool = False) -> ort.RunOptions | None:
    """Run options for an encoder run on `samples` samples of audio (all clips together);
    `shrink`: give the arena back after this run whatever its size (a server's batches)."""
    if not shrink and (input_kind != "raw_audio" or samples <= SHRINK_ABOVE_SAMPLES):
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def provider_label(ort_provider: str) -> str:
    """`cuda` or `cpu` for an ORT provider name."""
    return "cuda" if ort_provider == _ORT_PROVIDER["cuda"] else "cpu"


def active_provider(session: ort.InferenceSession) -> str:
    return provider_label(session.get_providers()[0])


def open_bundle_graph(graph: Path, options: SessionOptions, record: GraphFile, folder: Path) -> ort.InferenceSession:
    """A session for one of a bundle's graphs, which must take the inputs its manifest
    records (a decoder graph in an encoder bundle does not); a file ONNX Runtime cannot read
    is the bundle's fault."""
    try:
        session = create_session(graph, options)
    except RuntimeUserError:
        raise
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception classes (InvalidProtobuf, Fail, InvalidGraph)
        if not type(err).__module__.startswith("onnxruntime"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BundleError(f"{graph} is not a graph ONNX Runtime can load ({type(err).__name__}: {first[:200]}); export the bundle again") from err
    found = sorted(i.name for i in session.get_inputs())
    recorded = sorted(t.name for t in record.inputs)
    if found != recorded:
        raise BundleError(
            f"the graph of {folder} takes inputs {', '.join(found[:4])}{' ...' if len(found) > 4 else ''}, but its manifest records "
            f"{', '.join(recorded[:4]) or 'none'}{' ...' if len(recorded) > 4 else ''}: the graph was replaced; export the bundle again"
        )
    return session
