"""Benchmark presets: which models (random weights from configs) and which inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lalm_export.tiny import tiny_config


def base_config(family: str) -> Any:
    """Real architecture sizes: wav2vec2-base and HuBERT-base (the default configs), the
    Whisper-base encoder and a Qwen2.5-0.5B-sized decoder."""
    import transformers

    if family == "wav2vec2":
        return transformers.Wav2Vec2Config()
    if family == "hubert":
        return transformers.HubertConfig()
    if family == "whisper":
        # The decoder is not benchmarked: one small layer keeps the checkpoint light.
        return transformers.WhisperConfig(
            d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048, num_mel_bins=80,
            decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=2048, max_source_positions=1500,
        )
    if family == "llm":
        return transformers.Qwen2Config(
            hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
            vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
        )
    raise ValueError(f"no base config for family {family!r}")


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
        description="real architecture sizes with random weights: wav2vec2-base, HuBERT-base, Whisper-base encoder, "
        "Qwen2.5-0.5B-sized decoder",
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
        description="base sizes on a GPU (benchmarks/gpu/run.sh): wav2vec2-base, HuBERT-base, Whisper-base encoder, "
        "Qwen2.5-0.5B-sized decoder, random weights",
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
