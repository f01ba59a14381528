"""Audio LLMs people already have, as Hugging Face checkpoints: one row per architecture says
how to take its audio tower and projector apart from its language model, so that an export
of one is the same three-graph bundle as an export of this package's `LALM` (audio encoder +
projector, token table, decoder on `inputs_embeds`).

Supported:
- Qwen2-Audio (`model_type` "qwen2_audio"). Its audio tower is a Whisper-style encoder on a
  128-bin log-mel window of 30 s that masks the window's padding, average-pooled by 2; a clip
  of n samples takes ceil(n / 160) mel frames, then (m - 1) // 2 + 1 after the strided
  convolution and (c - 2) // 2 + 1 positions after the pooling, as the checkpoint's processor
  expands its one `<|AUDIO|>` token. Prompts come from its chat template.
- Voxtral (`model_type` "voxtral"). Its audio tower is a Whisper encoder on the whole 30 s
  window (padding included, unmasked); the projector takes 4 frames at a time, so every clip
  of up to 30 s takes 375 `[AUDIO]` positions. Its tokenizer is Mistral's Tekken
  (`tekken.json`, read with mistral-common); the bundle carries it converted to
  `tokenizer.json`, and its prompt is mistral-common's transcription request.
- Granite Speech (`model_type` "granite_speech"). A conformer on stacked log-mel frames (two
  80-bin frames each, any length) with block attention, then a Q-Former over windows of 15
  frames giving 3 positions each; its chat template reads content as one string with
  `<|audio|>` in it; a placeholder its model generates is embedded as token 0.

The audio graphs are in `tower_graphs.py`; docs/pretrained-lalms.md has what each is tested with."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lalm_export.errors import OptionsError
from lalm_export.models.families import FamilySpec, get_family
from lalm_export.models.tower_graphs import GraniteSpeechTowerGraph, PlaceholderAsToken, Qwen2AudioTowerGraph, VoxtralTowerGraph


@dataclass(frozen=True)
class TextFormat:
    """What a bundle of a checkpoint reads and writes text with."""

    tokenizer: Any  # a tokenizers-backed tokenizer: the bundle carries it as tokenizer.json
    prompt: str  # the default prompt, the audio placeholder once where the audio goes
    chat_template: str | None  # the template chat requests are rendered with, None for none
    chat_content: str = "parts"  # the content form the template reads (runtime.chat.ChatTemplate)


@dataclass(frozen=True)
class PretrainedLalm:
    """A checkpoint architecture's registry row."""

    model_type: str
    model_class: str  # the transformers class of the whole checkpoint
    spec: FamilySpec  # the audio input as the export and the runtime see it
    split: Callable[[nn.Module, FamilySpec, dict[str, Any]], tuple[nn.Module, nn.Module]]  # (audio graph, causal LM)
    audio_token: Callable[[Any, Any], tuple[str, int]]  # the placeholder the processor expands and its id, from config and processor
    text: Callable[[Any, str], TextFormat]  # the bundle's tokenizer, prompt and chat template, from processor and placeholder
    needs: tuple[str, str] | None = None  # (module, how to install it): what its processor imports beyond transformers


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The checkpoint's language model and output head as one causal LM of its text config,
    its output head tied to its embedding exactly when the checkpoint's is: a text config may
    say `tie_word_embeddings` where the whole model does not tie (Qwen2-Audio's does not), and
    loading a separate head into a tied one would overwrite the embedding. Checked weight by
    weight against the checkpoint."""
    import copy

    from transformers import AutoModelForCausalLM

    head, embedding = model.lm_head.weight, model.get_input_embeddings().weight
    config = copy.deepcopy(model.config.text_config)
    config.tie_word_embeddings = head.data_ptr() == embedding.data_ptr()
    decoder = AutoModelForCausalLM.from_config(config)
    decoder.model.load_state_dict(model.model.language_model.state_dict())
    decoder.lm_head.load_state_dict(model.lm_head.state_dict())
    if not (torch.equal(decoder.lm_head.weight, head) and torch.equal(decoder.get_input_embeddings().weight, embedding)):
        raise OptionsError("the checkpoint's language model could not be taken apart with its output head and embedding intact; report this checkpoint")
    return decoder.eval()


def _qwen2_audio_split(model: nn.Module, spec: FamilySpec, feature_config: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    inner = model.model
    graph = Qwen2AudioTowerGraph(inner.audio_tower, inner.multi_modal_projector, spec, int(feature_config.get("hop_length", 160)))
    return graph.eval(), causal_lm_of(model)


def _voxtral_split(model: nn.Module, spec: FamilySpec, feature_config: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    return VoxtralTowerGraph(model.model.audio_tower, model.model.multi_modal_projector, spec).eval(), causal_lm_of(model)


TRANSCRIBE = "Transcribe the audio."


def chat_template_text(processor: Any, audio_token: str) -> TextFormat:
    """A checkpoint whose tokenizer is Hugging Face's: its prompt is its chat template's
    rendering of one user turn holding the audio and an instruction to transcribe it, ready
    for the answer; the content as parts (`{type: audio}`, `{type: text}`) where the template
    reads parts, else as one string with the placeholder in it; the placeholder and the
    instruction where it has neither or no template."""
    template = getattr(processor, "chat_template", None)
    if template:
        parts = [{"type": "audio", "audio_url": "clip"}, {"type": "text", "text": TRANSCRIBE}]
        for content, form in ((parts, "parts"), (f"{audio_token}{TRANSCRIBE}", "text")):
            prompt = rendered([{"role": "user", "content": content}], processor)
            if prompt is not None and prompt.count(audio_token) == 1:
                return TextFormat(processor.tokenizer, prompt, template, form)
    return TextFormat(processor.tokenizer, f"{audio_token}{TRANSCRIBE}", None)


def rendered(turns: list[dict[str, Any]], processor: Any) -> str | None:
    """The processor's chat template on `turns`, ready for the answer; None where it cannot read them."""
    try:
        return processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template reading another content form fails in Jinja, any error
        return None


# Mistral's instruct format as mistral-common encodes a chat (v7 tokenizers): an audio part is
# `[BEGIN_AUDIO]` and its `[AUDIO]` positions, which the runtime puts in place of the one here.
MISTRAL_CHAT_TEMPLATE = """{{- '<s>' -}}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
[SYSTEM_PROMPT]{{ message['content'] if message['content'] is string else message['content'] | map(attribute='text') | join('') }}[/SYSTEM_PROMPT]
{%- elif message['role'] == 'user' -%}
[INST]{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- else -%}[BEGIN_AUDIO][AUDIO]{%- endif -%}
{%- endfor -%}{%- endif -%}[/INST]
{%- elif message['role'] == 'assistant' -%}
{{ message['content'] if message['content'] is string else message['content'] | map(attribute='text') | join('') }}</s>
{%- endif -%}
{%- endfor -%}"""


def mistral_text(processor: Any, audio_token: str) -> TextFormat:
    """A checkpoint whose tokenizer is Mistral's Tekken: the bundle's tokenizer is it converted
    to Hugging Face's format; its prompt is mistral-common's transcription request for a clip
    (language detected by the model), the run of placeholders kept once. The prompt must encode
    back to the same ids through the converted tokenizer, or the export stops."""
    import numpy as np
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    tokenizer = convert_tekken_tokenizer(str(processor.tokenizer._tokenizer_path), chat_template=MISTRAL_CHAT_TEMPLATE)
    silence = np.zeros(16_000, dtype=np.float32)
    request = processor.apply_transcription_request(audio=[silence], sampling_rate=16_000, format=["wav"], model_id="lalm-export", return_tensors="pt")
    audio_id = tokenizer.convert_tokens_to_ids(audio_token)
    ids = [int(t) for t in request["input_ids"][0]]
    kept = [t for i, t in enumerate(ids) if not (t == audio_id and i and ids[i - 1] == audio_id)]
    prompt = tokenizer.decode(kept, skip_special_tokens=False)
    if tokenizer.encode(prompt, add_special_tokens=False) != kept:
        raise OptionsError(
            f"the checkpoint's Tekken tokenizer, converted to tokenizer.json, does not encode its transcription prompt {prompt!r} back to the same ids"
        )
    return TextFormat(tokenizer, prompt, MISTRAL_CHAT_TEMPLATE)


def _config_audio_token(config: Any, processor: Any) -> tuple[str, int]:
    return checked_audio_token(processor.audio_token, int(config.audio_token_id), processor.tokenizer)


def _granite_speech_split(model: nn.Module, spec: FamilySpec, feature_config: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    hop = int(feature_config.get("melspec_kwargs", {}).get("hop_length", 160))
    decoder = causal_lm_of(model)
    decoder.set_input_embeddings(PlaceholderAsToken(decoder.get_input_embeddings(), int(model.config.audio_token_id)))
    return GraniteSpeechTowerGraph(model.model.encoder, model.model.projector, spec, hop).eval(), decoder


def _whisper_like(name: str) -> FamilySpec:
    return dataclasses.replace(get_family("whisper"), name=name, model_types=(name,))


PRETRAINED = {
    "qwen2_audio": PretrainedLalm(
        model_type="qwen2_audio",
        model_class="Qwen2AudioForConditionalGeneration",
        spec=_whisper_like("qwen2_audio"),
        split=_qwen2_audio_split,
        audio_token=_config_audio_token,
        text=chat_template_text,
    ),
    "voxtral": PretrainedLalm(
        model_type="voxtral",
        model_class="VoxtralForConditionalGeneration",
        spec=_whisper_like("voxtral"),
        split=_voxtral_split,
        audio_token=_config_audio_token,
        text=mistral_text,
        needs=("mistral_common", "pip install 'lalm-export[mistral]'"),
    ),
    "granite_speech": PretrainedLalm(
        model_type="granite_speech",
        model_class="GraniteSpeechForConditionalGeneration",
        spec=dataclasses.replace(_whisper_like("granite_speech"), input_kind="stacked_log_mel", dynamic_length=True),
        split=_granite_speech_split,
        audio_token=_config_audio_token,
        text=chat_template_text,
        needs=("torchaudio", "pip install torchaudio (the build of your torch version)"),
    ),
}


def check_needs(row: PretrainedLalm, folder: Path) -> None:
    """Refuse in one line a checkpoint whose processor needs a package that is not installed."""
    import importlib.util

    if row.needs is not None and importlib.util.find_spec(row.needs[0]) is None:
        module, install = row.needs
        raise OptionsError(f"{folder} is a {row.model_type!r} checkpoint, whose processor needs {module}: {install}")


def checked_audio_token(token: str, token_id: int, tokenizer: Any) -> tuple[str, int]:
    """The processor's placeholder and the config's id for it, which must be the tokenizer's."""
    if tokenizer.convert_tokens_to_ids(token) != token_id:
        raise OptionsError(
            f"the checkpoint's processor calls the audio placeholder {token!r}, which its tokenizer gives id "
            f"{tokenizer.convert_tokens_to_ids(token)}, but its config says {token_id}: the checkpoint is inconsistent; save it again"
        )
    return token, token_id


def pretrained_row(folder: Path) -> PretrainedLalm | None:
    """The row of the checkpoint in `folder` (a Hugging Face folder with a config.json of a
    supported `model_type`), None for any other folder."""
    import json

    config = folder / "config.json"
    if (folder / "lalm_config.json").exists() or not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None
    if model_type in PRETRAINED:
        return PRETRAINED[model_type]
    raise OptionsError(
        f"{folder} is a {model_type!r} checkpoint; --lalm takes an LALM saved by LALM.save_pretrained() or a checkpoint of {', '.join(sorted(PRETRAINED))}"
    )
