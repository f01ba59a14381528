"""Tiny random checkpoints built from config classes, saved with `save_pretrained` so
they load through the real loading code. For the demo, tests and benchmarks: no hub.

Sizes respect bitsandbytes' CPU kernel: every Linear has in_features >= 64."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lalm_export.models.families import TINY_VOCAB, get_family

_CORPUS = (
    "the quick brown fox jumps over the lazy dog. audio language models listen and speak. "
    "hello, how are you? the capital of france is paris. speech is turned into features, "
    "features into tokens, tokens into text. one two three four five six seven eight nine ten. "
)


def build_tiny_tokenizer(folder: str | Path, vocab_size: int = TINY_VOCAB):
    """A byte-level BPE tokenizer trained on a few sentences; no pad token (the wrapper sets one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return fast


def save_random_checkpoint(family: str, folder: str | Path, config: Any, seed: int = 0, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a randomly initialised `family` model built from `config`, with the feature
    extractor or tokenizer its loading code expects, to `folder`. `weights` (a partial state
    dict, e.g. real encoder weights) replace the random ones; every key must exist."""
    spec = get_family(family)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if spec.role == "decoder":
        import transformers

        build_tiny_tokenizer(folder)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.generation_config.pad_token_id = None
    else:
        model = spec.model_cls()(config)
    _replace_weights(model, weights)
    model.save_pretrained(str(folder), safe_serialization=True)
    if spec.feature_extractor is not None:
        spec.feature_extractor.build(config).save_pretrained(str(folder))
    return folder


def _replace_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None) -> None:
    if not weights:
        return
    unknown = set(weights) - set(model.state_dict())
    if unknown:
        raise ValueError(f"weights for parameters the model does not have: {sorted(unknown)[:5]}")
    model.load_state_dict(weights, strict=False)


def tiny_config(family: str) -> Any:
    """The registry's tiny config of `family` (a decoder's vocabulary is the tiny tokenizer's)."""
    return get_family(family).tiny.build()


def build_tiny_checkpoint(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random checkpoint of `family` (with feature extractor or tokenizer) to `folder`."""
    return save_random_checkpoint(family, folder, tiny_config(family), seed)


def tiny_input(family: str, batch: int = 2, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A random input of the family's kind: log-mel (the tiny config's mel bins, 3000 frames) or raw 16 kHz audio."""
    generator = torch.Generator().manual_seed(seed)
    spec = get_family(family)
    if spec.input_kind == "log_mel":
        return torch.randn(batch, int(tiny_config(family).num_mel_bins), 3000, generator=generator)
    return torch.randn(batch, int(16_000 * seconds), generator=generator) * 0.1


def save_random_qwen2_audio(folder: str | Path, audio: dict[str, Any], text: dict[str, Any], seed: int = 0) -> Path:
    """A random Qwen2-Audio checkpoint (`Qwen2AudioEncoderConfig(**audio)`, `Qwen2Config(**text)`)
    and its processor in `folder`, as `lalm-export --lalm` takes one: a tokenizer built offline
    with the audio tokens the published checkpoints add, a 128-bin Whisper feature extractor.
    `text` without a vocab_size gets the tokenizer's."""
    from transformers import (
        AutoTokenizer,
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    folder = Path(folder)
    build_tiny_tokenizer(folder / "tokenizer-source")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer-source")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]})
    config = Qwen2AudioConfig(
        audio_config=Qwen2AudioEncoderConfig(**audio),
        text_config=Qwen2Config(**{"vocab_size": len(tokenizer), **text}),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(seed)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(folder / "checkpoint")
    Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer).save_pretrained(folder / "checkpoint")
    return folder / "checkpoint"
