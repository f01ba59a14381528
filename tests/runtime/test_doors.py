"""One table of requests through every door of the runtime: the Python API (`runtime.api`),
`runtime.infer`, `runtime.batch`, the HTTP server (the `openai` SDK on 127.0.0.1) and the Ray
deployment's `transcribe` handle (its request path, `runtime.server.ray_serve.transcribe_bytes`,
on an engine of its own; Ray itself is started by the slow tests in test_ray.py). The same
request gives the same answer through each door that takes it (greedy decoding)."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from runtime.api import load
from runtime.batch import main as batch_main
from runtime.generation import GenerationOptions
from runtime.infer import main as infer_main
from runtime.server.engine import Engine, ServeSettings, load_models
from runtime.server.ray_serve import transcribe_bytes
from runtime.sessions import SessionOptions
from tests.helpers import run_main
from tests.runtime.serving import running_server

TOKENS = 10


@dataclass(frozen=True)
class Transcribe:
    clip: int  # index into audio_files
    prompt: str | None  # None: the bundle's own; text without the placeholder: an instruction after the audio


TRANSCRIPTIONS = [
    Transcribe(0, None),
    Transcribe(2, "Write down what you hear."),
    Transcribe(1, "<|audio|>Say what you hear:"),
]
COMPLETIONS = ["hello there", "the quick brown fox"]


@pytest.fixture(scope="module")
def server(serve_bundles):
    with running_server(serve_bundles, ServeSettings(max_new_tokens=TOKENS)) as (url, engine):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def through_api(bundle: Path, request: Transcribe, audio_files) -> tuple[str, list[int]]:
    result = load(bundle).transcribe(audio_files[request.clip], request.prompt, GenerationOptions(max_new_tokens=TOKENS))[0]
    return result.text, result.tokens


def through_infer(bundle: Path, request: Transcribe, audio_files, capsys) -> tuple[str, list[int]]:
    prompt = ["--prompt", request.prompt] if request.prompt is not None else []
    result = run_main(infer_main, bundle, "--audio", audio_files[request.clip], *prompt, "--max-new-tokens", TOKENS, "--json", "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    return record["text"], record["tokens"]


def through_batch(bundle: Path, request: Transcribe, audio_files, capsys, tmp_path: Path) -> tuple[str, list[int]]:
    output = tmp_path / f"batch-{request.clip}.jsonl"
    prompt = ["--prompt", request.prompt] if request.prompt is not None else []
    result = run_main(batch_main, bundle, "--input", audio_files[request.clip], "--output", output, *prompt, "--max-new-tokens", TOKENS, "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    record = json.loads(output.read_text().splitlines()[0])
    return record["text"], record["tokens"]


def through_http(client: openai.OpenAI, request: Transcribe, audio_files) -> str:
    with open(audio_files[request.clip], "rb") as handle:
        return client.audio.transcriptions.create(model="lalm", file=handle, **({"prompt": request.prompt} if request.prompt is not None else {})).text


def through_ray_handle(bundle: Path, request: Transcribe, audio_files) -> tuple[str, list[int]]:
    engine = Engine(load_models([bundle], ["lalm"], SessionOptions(provider="cpu")), ServeSettings())
    try:
        result = asyncio.run(transcribe_bytes(engine, "lalm", audio_files[request.clip].read_bytes(), request.prompt, TOKENS))
    finally:
        engine.close()
    return result["text"], result["tokens"]


@pytest.mark.parametrize("request_", TRANSCRIPTIONS, ids=lambda r: f"clip{r.clip}-{'default' if r.prompt is None else r.prompt[:12]}")
def test_a_transcription_is_the_same_through_all_five_doors(request_, serve_bundles, audio_files, server, capsys, tmp_path):
    bundle = serve_bundles["lalm"]
    text, tokens = through_api(bundle, request_, audio_files)
    assert tokens, "a request that generates nothing would agree vacuously"
    assert through_infer(bundle, request_, audio_files, capsys) == (text, tokens)
    assert through_batch(bundle, request_, audio_files, capsys, tmp_path) == (text, tokens)
    assert through_http(server, request_, audio_files) == text
    assert through_ray_handle(bundle, request_, audio_files) == (text, tokens)


def test_the_prompt_rule_differs_between_an_instruction_and_the_bundle_prompt(serve_bundles, audio_files):
    """The table above would pass if every door ignored the prompt: it does not."""
    default, instructed = (through_api(serve_bundles["lalm"], request, audio_files)[1] for request in (Transcribe(2, None), TRANSCRIPTIONS[1]))
    assert default != instructed


@pytest.mark.parametrize("prompt", COMPLETIONS)
def test_a_completion_is_the_same_through_every_door_that_takes_text(prompt, serve_bundles, server, capsys):
    """runtime.batch and the Ray handle take audio only."""
    expected = load(serve_bundles["llm"]).complete([prompt], GenerationOptions(max_new_tokens=TOKENS))[0]
    result = run_main(infer_main, serve_bundles["llm"], "--prompt", prompt, "--max-new-tokens", TOKENS, "--json", "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    assert (record["text"], record["tokens"]) == (expected.text, expected.tokens) and expected.tokens
    reply = server.chat.completions.create(model="llm", messages=[{"role": "user", "content": prompt}], max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].message.content == expected.text and reply.usage.completion_tokens == len(expected.tokens)


def test_a_stop_string_ends_a_transcription_alike_through_the_api_infer_and_chat(serve_bundles, audio_files, server, capsys):
    """`runtime.infer --stop` with an audio LLM bundle was taken and ignored; a chat with audio
    honoured it. The transcription endpoint has no `stop` (OpenAI's has none)."""
    bundle, prompt = serve_bundles["lalm"], "<|audio|>Say what you hear:"
    full = load(bundle).transcribe(audio_files[1], prompt, GenerationOptions(max_new_tokens=TOKENS))[0].text
    assert len(full.strip()) >= 4, f"too little text to stop inside: {full!r}"
    stop = full.strip()[2:4]
    expected = full[: full.index(stop)]
    api = load(bundle).transcribe(audio_files[1], prompt, GenerationOptions(max_new_tokens=TOKENS), stop_strings=[stop])[0]
    assert api.text == expected and len(api.tokens) < TOKENS
    result = run_main(
        infer_main, bundle, "--audio", audio_files[1], "--prompt", prompt, "--stop", stop, "--max-new-tokens", TOKENS, "--json", "-q", capsys=capsys
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["text"] == expected
    audio = {"data": base64.b64encode(Path(audio_files[1]).read_bytes()).decode(), "format": "wav"}
    content = [{"type": "input_audio", "input_audio": audio}, {"type": "text", "text": "Say what you hear:"}]
    reply = server.chat.completions.create(model="lalm", messages=[{"role": "user", "content": content}], stop=[stop], max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].message.content == expected
