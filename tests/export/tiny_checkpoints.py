"""Tiny random checkpoints of published audio-LLM architectures with their processors, built
offline from transformers' config classes (no hub), for `lalm-export --lalm`'s tests."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


# Granite 3's chat template, cut to what a transcription uses: the content is text, the audio
# written in it as `<|audio|>` (as Granite Speech's model card prompts it).
GRANITE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)


def save_tiny_granite_speech(folder: Path, seed: int) -> Path:
    """A tiny random Granite Speech checkpoint (conformer encoder with block attention of 20
    frames, windowed Q-Former projector, Granite language model) and its processor."""
    from transformers import (
        AutoTokenizer,
        Blip2QFormerConfig,
        GraniteConfig,
        GraniteSpeechConfig,
        GraniteSpeechEncoderConfig,
        GraniteSpeechFeatureExtractor,
        GraniteSpeechForConditionalGeneration,
        GraniteSpeechProcessor,
    )

    from lalm_export.demo.tiny import build_tiny_tokenizer

    build_tiny_tokenizer(folder / "tokenizer-source")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer-source")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|audio|>", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"]})
    tokenizer.pad_token = tokenizer.eos_token = "<|end_of_text|>"  # as Granite's tokenizer has them
    tokenizer.chat_template = GRANITE_CHAT_TEMPLATE
    encoder = GraniteSpeechEncoderConfig(
        input_dim=160, num_layers=2, hidden_dim=32, num_heads=2, dim_head=16, output_dim=8, context_size=20, max_pos_emb=64, dropout=0.0
    )
    projector = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32)
    text = GraniteConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.2,
        embedding_multiplier=2.0,
        logits_scaling=0.5,
    )  # fmt: skip (wide weights: answers that vary from token to token; Granite's multipliers away from 1, as the real ones are)
    config = GraniteSpeechConfig(
        encoder_config=encoder, projector_config=projector, text_config=text, audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"),
        has_lora_adapter=False, window_size=15, downsample_rate=5,
    )  # fmt: skip
    torch.manual_seed(seed)
    GraniteSpeechForConditionalGeneration(config).save_pretrained(folder / "checkpoint")
    GraniteSpeechProcessor(GraniteSpeechFeatureExtractor(), tokenizer).save_pretrained(folder / "checkpoint")
    return folder / "checkpoint"


def save_tiny_qwen2_audio(folder: Path, seed: int, audio_width: int = 32) -> Path:
    """A tiny random Qwen2-Audio checkpoint and its processor. bitsandbytes' CPU 4-bit kernel
    runs Linear layers of at least 64 inputs: a 4-bit base takes `audio_width=64`."""
    from lalm_export.demo.tiny import save_random_qwen2_audio

    audio = {"d_model": audio_width, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 2 * audio_width, "num_mel_bins": 128}
    text = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 1024, "tie_word_embeddings": False,
    }  # fmt: skip
    return save_random_qwen2_audio(folder, audio, text, seed)


@dataclass(frozen=True)
class Architecture:
    """A supported architecture as the tests build and run it."""

    model_type: str
    model_class: str
    save: Callable[[Path, int], Path]  # (folder, seed) -> the checkpoint folder
    # the processor's inputs for (prompt, 16 kHz samples), as the checkpoint's users call it
    inputs: Callable[[Any, str, np.ndarray], dict[str, Any]]
    lora_targets: tuple[str, ...]  # LoRA on these touches the audio tower and the language model
    lora_layers: int  # the Linear layers they are in the tiny checkpoint

    def eager_tokens(self, checkpoint: Path, prompt: str, samples: np.ndarray, tokens: int) -> list[int]:
        """The checkpoint's own greedy tokens: its processor, then its `generate`."""
        import transformers

        processor = transformers.AutoProcessor.from_pretrained(checkpoint)
        model = getattr(transformers, self.model_class).from_pretrained(checkpoint).eval()
        inputs = self.inputs(processor, prompt, samples)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()


def _voxtral_inputs(processor: Any, prompt: str, samples: np.ndarray) -> dict[str, Any]:
    """mistral-common's transcription request, which is the bundle's prompt (test_voxtral checks it)."""
    return processor.apply_transcription_request(audio=[samples], sampling_rate=16_000, format=["wav"], model_id="tiny", return_tensors="pt")


ARCHITECTURES = {
    "qwen2_audio": Architecture(
        "qwen2_audio",
        "Qwen2AudioForConditionalGeneration",
        save_tiny_qwen2_audio,
        lambda processor, prompt, samples: processor(text=prompt, audio=samples, sampling_rate=16_000, return_tensors="pt"),
        ("q_proj", "v_proj"),
        8,  # q and v of 2 tower layers and 2 language-model layers
    ),
    "voxtral": Architecture("voxtral", "VoxtralForConditionalGeneration", save_tiny_voxtral, _voxtral_inputs, ("q_proj", "v_proj"), 8),
    "granite_speech": Architecture(
        "granite_speech",
        "GraniteSpeechForConditionalGeneration",
        save_tiny_granite_speech,
        lambda processor, prompt, samples: processor(text=prompt, audio=samples, return_tensors="pt"),
        ("to_q", "q_proj", "v_proj"),
        6,  # the conformer's 2 query projections, q and v of 2 language-model layers
    ),
}


def with_own_adapter(checkpoint: Path, folder: Path, targets: tuple[str, ...], seed: int) -> Path:
    """A copy of `checkpoint` that carries a LoRA adapter of its own (non-zero weights), as the
    published Granite Speech checkpoints do: `adapter_config.json` beside `config.json`, the base
    weights unchanged, `has_lora_adapter` set."""
    import shutil

    import transformers
    from peft import LoraConfig, get_peft_model

    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(checkpoint)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "has_lora_adapter": True}, indent=2))
    return folder
