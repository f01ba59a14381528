"""Voxtral checkpoints (issue 25), beyond what every architecture shows (test_pretrained_lalm):
its Tekken tokenizer, read by mistral-common, carried as tokenizer.json; its prompt is
mistral-common's transcription request; its chats are rendered as mistral-common renders them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import openai
import pytest

from runtime.api import load
from runtime.generation import GenerationOptions
from runtime.server.engine import ServeSettings
from tests.runtime.serving import running_server

TOKENS = 16


@pytest.fixture(scope="module")
def voxtral(tiny_lalm) -> tuple[Path, Path]:
    """(checkpoint, bundle exported from it)."""
    return tiny_lalm("voxtral")


def test_the_prompt_is_mistral_commons_transcription_request(voxtral):
    _, bundle = voxtral
    extra = json.loads((bundle / "manifest.json").read_text())["extra"]
    # its run of [AUDIO] kept once; the special ids from the Tekken file
    assert extra["prompt"] == "<s>[INST][BEGIN_AUDIO][AUDIO][/INST][TRANSCRIBE]"
    assert (extra["audio_token"], extra["bos_token_id"], extra["eos_token_id"]) == ("[AUDIO]", 1, 2)
    assert (bundle / "tokenizer.json").is_file() and not (bundle / "tekken.json").exists()  # the runtime reads no Tekken file


def test_every_clip_of_up_to_30_s_takes_375_audio_positions(voxtral, audio_files):
    """As the checkpoint's processor pads every clip to the 30 s window: 375 projected positions."""
    _, bundle = voxtral
    runner = load(bundle)
    prompt_ids = runner.prompt_ids(runner.facts["prompt"])
    for clip in (audio_files[0], audio_files[2]):
        result = runner.transcribe([clip], options=GenerationOptions(max_new_tokens=2))[0]
        assert result.prompt_tokens == len(prompt_ids) - 1 + 375


def mistral_chat_ids(checkpoint: Path, clip: Path, text: str) -> list[int]:
    """mistral-common's ids for one user turn (the clip, then `text`), its run of [AUDIO] kept once."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    turn = [{"role": "user", "content": [{"type": "audio", "path": str(clip)}, {"type": "text", "text": text}]}]
    ids = processor.apply_chat_template(turn, tokenize=True, return_dict=True)["input_ids"][0].tolist()
    return [t for i, t in enumerate(ids) if not (t == processor.audio_token_id and i and ids[i - 1] == t)]


def test_a_chat_through_runtime_serve_is_rendered_as_mistral_common_renders_it(voxtral, audio_files):
    checkpoint, bundle = voxtral
    runner = load(bundle)
    text = "Say what you hear."
    prompt = runner.instruction_prompt(text)
    assert runner.prompt_ids(prompt) == mistral_chat_ids(checkpoint, audio_files[1], text)
    expected = runner.transcribe([audio_files[1]], prompt, GenerationOptions(max_new_tokens=TOKENS, stop_at_eos=False))[0].text
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio_files[1].read_bytes()).decode(), "format": "wav"}}
    with running_server({"voxtral": bundle}, ServeSettings(max_new_tokens=TOKENS)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": [audio, {"type": "text", "text": text}]}]
        reply = client.chat.completions.create(model="voxtral", messages=messages, max_tokens=TOKENS, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected
