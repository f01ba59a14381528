"""Benchmark presets: which models (random weights from configs) and which inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lalm_export.demo.tiny import tiny_config
from lalm_export.models.families import get_family
from runtime.cpu import has_bf16


def base_config(family: str) -> Any:
    """The registry's real architecture sizes of `family` (random weights): wav2vec2-base-sized
    encoders, the Whisper-base encoder, a Qwen2.5-0.5B-sized decoder."""
    return get_family(family).base.build()


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: Callable[[str], Any]
    audio_seconds: float  # per clip; Whisper always encodes its 30 s window
    encoder_batches: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    warmup: int
    repeats: int  # timed runs per variant, interleaved
    decoder_repeats: int
    min_sample_s: float = 0.0  # an encoder timing sample repeats short calls to last this long
    threads: int = 0  # torch and ONNX Runtime intra-op threads; 0: their defaults (one per core)
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # role -> exported precisions


DEFAULT_VARIANTS = {"encoder": ("fp32", "int8"), "decoder": ("fp32", "int8", "int4", "int4-b128")}
GPU_VARIANTS = {"encoder": ("fp32", "fp16"), "decoder": ("fp32", "fp16")}


def eager_precisions(provider: str) -> tuple[str, ...]:
    """The eager references on `provider`: fp32, and what a user would run instead of it there:
    fp16 on CUDA; bf16 on a CPU with bf16 instructions (without them PyTorch emulates bf16 at
    a few percent of its fp32 speed: nobody would run it, and it would take the run's time)."""
    if provider == "cuda":
        return ("fp32", "fp16")
    return ("fp32", "bf16") if has_bf16() else ("fp32",)


def eager_references(model: Any, provider: str) -> dict[str, Any]:
    """precision -> eager model timed against: `model` itself (fp32), then a copy cast to each
    other reference precision of `provider`."""
    import copy

    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return {"fp32": model, **{precision: copy.deepcopy(model).to(dtypes[precision]) for precision in eager_precisions(provider)[1:]}}


PRESETS = {
    "tiny": Preset(
        name="tiny",
        description="tiny random models (hidden 64, 2 layers): seconds, for CI",
        config=tiny_config,
        audio_seconds=1.0,
        encoder_batches=(1, 4),
        prompt_tokens=32,
        new_tokens=32,
        warmup=3,
        repeats=21,
        decoder_repeats=15,
        min_sample_s=0.05,
        # One thread each: millisecond-sized calls on shared 2-core CI machines are otherwise
        # dominated by thread scheduling, which differs from run to run.
        threads=1,
        variants=DEFAULT_VARIANTS,
    ),
    "base": Preset(
        name="base",
        description="real architecture sizes with random weights: base-sized encoders (wav2vec2-base, HuBERT-base, "
        "WavLM-base, Data2VecAudio-base, the Whisper-base encoder), Qwen2.5-0.5B-sized decoder",
        config=base_config,
        audio_seconds=10.0,
        encoder_batches=(1, 4),
        prompt_tokens=128,
        new_tokens=64,
        warmup=1,
        repeats=5,
        decoder_repeats=3,
        variants=DEFAULT_VARIANTS,
    ),
    "gpu": Preset(
        name="gpu",
        description="base sizes on a GPU (benchmarks/gpu/run.sh): base-sized encoders, the Whisper-base encoder, Qwen2.5-0.5B-sized decoder, random weights",
        config=base_config,
        audio_seconds=10.0,
        encoder_batches=(1, 8),
        prompt_tokens=128,
        new_tokens=64,
        warmup=3,
        repeats=20,
        decoder_repeats=3,
        variants=GPU_VARIANTS,
    ),
}
