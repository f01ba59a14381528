"""Command-line flags that runtime.infer, runtime.batch and runtime.serve share (kept apart
from runtime.sessions so that building a parser, and `--help`, imports no ONNX Runtime)."""

from __future__ import annotations

from typing import Any

# Prompt positions prefilled between two decode steps (`runtime.scheduler`; vLLM's
# max_num_batched_tokens plays this part): a step of the running streams waits for at most this
# much prefill work (a longer prompt's chunk, or the prompts of a batch that fit). Here so that
# runtime.serve's --help shows it without importing ONNX Runtime.
PREFILL_POSITIONS_PER_STEP = 256


def add_session_flags(group: Any, past_memory: str = "longer clips are refused with the length that fits") -> None:
    """--provider, --threads and --max-clip-memory-gb, as runtime.infer, runtime.batch and
    runtime.serve take them; `past_memory` says what happens to a clip past the memory bound."""
    group.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when onnxruntime-gpu and a GPU are present, else CPU")
    group.add_argument("--threads", type=int, default=0, help="intra-op threads per session (0: ONNX Runtime's default)")
    group.add_argument(
        "--max-clip-memory-gb",
        type=float,
        help=f"memory one audio clip may take in the encoder, in GB; {past_memory} "
        "(default: a quarter of this machine's memory, at most 8; docs/reliability.md has the figures)",
    )
