"""Tiny random checkpoints built from config classes, saved with `save_pretrained` so
they load through the real loading code. For the demo, tests and benchmarks: no hub.

Sizes respect bitsandbytes' CPU kernel: every Linear has in_features >= 64."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

TINY_HIDDEN = 64
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. audio language models listen and speak. "
    "hello, how are you? the capital of france is paris. speech is turned into features, "
    "features into tokens, tokens into text. one two three four five six seven eight nine ten. "
)


def _audio_common() -> dict:
    return dict(
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(64, 64, 64),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 8, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0,
        vocab_size=32,
    )


def tiny_wav2vec2_config():
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(**_audio_common())


def tiny_hubert_config():
    from transformers import HubertConfig

    return HubertConfig(**_audio_common())


def tiny_whisper_config():
    from transformers import WhisperConfig

    return WhisperConfig(
        d_model=TINY_HIDDEN,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=64,
        vocab_size=128,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


TINY_VOCAB = 320


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


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=TINY_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


AUDIO_MODEL_CLASSES = {"whisper": "WhisperModel", "hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model"}
TINY_CONFIGS: dict[str, Callable] = {"whisper": tiny_whisper_config, "hubert": tiny_hubert_config, "wav2vec2": tiny_wav2vec2_config}


def save_random_checkpoint(family: str, folder: str | Path, config, seed: int = 0, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a randomly initialised `family` model built from `config`, with the feature
    extractor or tokenizer its loading code expects, to `folder`. `weights` (a partial state
    dict, e.g. real encoder weights) replace the random ones; every key must exist."""
    import transformers
    from transformers import Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if family == "llm":
        build_tiny_tokenizer(folder)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        _replace_weights(model, weights)
        model.generation_config.pad_token_id = None
        model.save_pretrained(str(folder), safe_serialization=True)
        return folder
    _require_known(family, AUDIO_MODEL_CLASSES, "checkpoint builder")
    torch.manual_seed(seed)
    model = getattr(transformers, AUDIO_MODEL_CLASSES[family])(config)
    _replace_weights(model, weights)
    model.save_pretrained(str(folder), safe_serialization=True)
    if family == "whisper":
        WhisperFeatureExtractor(feature_size=int(config.num_mel_bins)).save_pretrained(str(folder))
    else:
        Wav2Vec2FeatureExtractor(return_attention_mask=family == "wav2vec2").save_pretrained(str(folder))
    return folder


def _replace_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None) -> None:
    if not weights:
        return
    unknown = set(weights) - set(model.state_dict())
    if unknown:
        raise ValueError(f"weights for parameters the model does not have: {sorted(unknown)[:5]}")
    model.load_state_dict(weights, strict=False)


def tiny_config(family: str):
    """The tiny config of `family` (the decoder's vocabulary is the tiny tokenizer's)."""
    if family == "llm":
        return tiny_llama_config(TINY_VOCAB)
    _require_known(family, TINY_CONFIGS, "tiny config")
    return TINY_CONFIGS[family]()


def _require_known(family: str, table: dict, what: str) -> None:
    """An unknown family raises the registry's error listing the known ones; a registered
    family missing from `table` is a gap in this module."""
    if family not in table:
        from lalm_export.families import get_family

        get_family(family)
        raise ValueError(f"no {what} for family {family!r}")


def build_tiny_checkpoint(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random checkpoint of `family` (with feature extractor or tokenizer) to `folder`."""
    return save_random_checkpoint(family, folder, tiny_config(family), seed)


def speech_like(seconds: float, rate: int = 16_000, seed: int = 0):
    """Speech-like audio (numpy float32): voiced harmonics under a syllable-rate envelope, plus breath noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def tiny_input(family: str, batch: int = 2, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A random input of the right kind: log-mel (Whisper, 3000 frames) or raw 16 kHz audio."""
    generator = torch.Generator().manual_seed(seed)
    if family == "whisper":
        return torch.randn(batch, 80, 3000, generator=generator)
    return torch.randn(batch, int(16_000 * seconds), generator=generator) * 0.1
