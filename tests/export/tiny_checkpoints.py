"""Tiny random checkpoints of published audio-LLM architectures with their processors, built
offline from transformers' config classes (no hub), for `lalm-export --lalm`'s tests."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch

# Mistral's control tokens at the ranks its v7 Tekken files give them; VoxtralProcessor
# expects `[AUDIO]` at 24. The rest of the first 100 ranks are fillers, as in the real files.
TEKKEN_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]",
    16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 32: "[ARGS]",
    33: "[CALL_ID]", 34: "[TRANSCRIBE]",
}  # fmt: skip
TEKKEN_MERGES = ("th", "he", "in", "er", "an", " t", " a", "the", " the", "re", "on", "at", "en", "nd", "es", "or", "is", "ing", " s", "ed")
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_tekken(folder: Path) -> Path:
    """A Tekken tokenizer file (mistral-common's format, version v7 with audio): 100 control
    ranks, the 256 bytes and a few merges."""
    specials = [{"rank": i, "token_str": TEKKEN_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True} for i in range(100)]
    pieces = [bytes([i]) for i in range(256)] + [merge.encode() for merge in TEKKEN_MERGES]
    vocab = [{"rank": i, "token_bytes": base64.b64encode(piece).decode(), "token_str": None} for i, piece in enumerate(pieces)]
    config = {"pattern": TEKKEN_PATTERN, "default_vocab_size": 100 + len(vocab), "default_num_special_tokens": 100, "version": "v7"}
    audio = {
        "sampling_rate": 16_000,
        "frame_rate": 12.5,
        "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
        "chunk_length_s": 30.0,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tekken.json"
    path.write_text(json.dumps({"config": config, "vocab": vocab, "special_tokens": specials, "audio": audio}), encoding="utf-8")
    return path


def save_tiny_voxtral(folder: Path, seed: int) -> Path:
    """A tiny random Voxtral checkpoint (Whisper tower, Llama language model) and its processor,
    whose tokenizer is a Tekken file read by mistral-common, as the published checkpoints'."""
    from transformers import LlamaConfig, VoxtralConfig, VoxtralEncoderConfig, VoxtralForConditionalGeneration, VoxtralProcessor, WhisperFeatureExtractor
    from transformers.tokenization_mistral_common import MistralCommonBackend

    tokenizer = MistralCommonBackend.from_pretrained(str(write_tekken(folder / "tokenizer-source").parent))
    # intermediate_size = 4 x hidden: the projector takes 4 tower frames at a time, as Voxtral's does
    audio = VoxtralEncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, num_mel_bins=128)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = VoxtralConfig(audio_config=audio, text_config=text, audio_token_id=tokenizer.convert_tokens_to_ids("[AUDIO]"))
    torch.manual_seed(seed)
    VoxtralForConditionalGeneration(config).save_pretrained(folder / "checkpoint")
    VoxtralProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer).save_pretrained(folder / "checkpoint")
    return folder / "checkpoint"
