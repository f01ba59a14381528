"""`runtime.serve` through the client people use against it: the `openai` SDK on 127.0.0.1.
Answers must equal `runtime.infer`'s for the same inputs (greedy)."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx2 as httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from runtime.infer import main as infer_main
from runtime.scheduler import ScheduledBackend
from runtime.server.engine import ServeSettings
from tests.helpers import SUBPROCESS_TIMEOUT_S, assert_user_error, run_main
from tests.runtime.serving import running_draining_server, running_server, serve_process

TOKENS = 12


@pytest.fixture(scope="module")
def server(serve_bundles):
    with running_server(serve_bundles, ServeSettings(max_new_tokens=TOKENS, max_batch_wait_ms=50, max_queue=32)) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def infer_json(capsys, bundle, *args) -> list[dict]:
    result = run_main(infer_main, bundle, *args, "--max-new-tokens", TOKENS, "--json", "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_models_lists_every_bundle_with_role_precision_and_provider(client, serve_bundles):
    cards = {model.id: model for model in client.models.list()}
    assert sorted(cards) == ["lalm", "llm", "wav2vec2"]
    assert {cards[name].role for name in cards} == {"lalm", "decoder", "encoder"}
    assert cards["lalm"].precision and cards["lalm"].provider == "cpu" and cards["lalm"].owned_by == "lalm-export"
    assert cards["lalm"].prompt == json.loads((serve_bundles["lalm"] / "manifest.json").read_text())["extra"]["prompt"]  # the one it was trained with


def test_transcription_equals_runtime_infer(client, serve_bundles, audio_files, capsys):
    expected = infer_json(capsys, serve_bundles["lalm"], "--audio", audio_files[2])[0]
    with open(audio_files[2], "rb") as handle:
        result = client.audio.transcriptions.create(model="lalm", file=handle)
    assert result.text == expected["text"] and result.text
    with open(audio_files[2], "rb") as handle:
        verbose = client.audio.transcriptions.create(model="lalm", file=handle, response_format="verbose_json")
    assert verbose.text == expected["text"] and verbose.duration == pytest.approx(1.5)
    assert verbose.model_extra["tokens"] == expected["tokens"]
    assert set(verbose.model_extra["timings"]) == {"encoder_s", "prefill_s", "decode_s"}
    with open(audio_files[2], "rb") as handle:
        text = client.audio.transcriptions.create(model="lalm", file=handle, response_format="text")
    assert text.strip() == expected["text"].strip()


def test_transcription_streams_deltas_then_done(client, serve_bundles, audio_files, capsys):
    expected = infer_json(capsys, serve_bundles["lalm"], "--audio", audio_files[3], "--prompt", "Say what you hear:")[0]
    with open(audio_files[3], "rb") as handle:
        events = list(client.audio.transcriptions.create(model="lalm", file=handle, prompt="Say what you hear:", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) > 1 and len(done) == 1
    assert "".join(deltas) == done[0].text == expected["text"]
    assert done[0].usage.output_tokens == len(expected["tokens"])


def _audio_part(path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"}}


def test_chat_with_audio_equals_runtime_infer_streaming_and_not(client, serve_bundles, audio_files, capsys):
    expected = infer_json(capsys, serve_bundles["lalm"], "--audio", audio_files[0], "--prompt", "Transcribe the audio:")[0]
    messages = [{"role": "user", "content": [_audio_part(audio_files[0]), {"type": "text", "text": "Transcribe the audio:"}]}]
    reply = client.chat.completions.create(model="lalm", messages=messages, max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.completion_tokens == len(expected["tokens"]) and reply.usage.prompt_tokens > 0
    eos = json.loads((serve_bundles["lalm"] / "manifest.json").read_text())["extra"]["eos_token_id"]
    assert reply.choices[0].finish_reason == ("stop" if expected["tokens"][-1] == eos else "length")
    chunks = list(
        client.chat.completions.create(model="lalm", messages=messages, max_completion_tokens=TOKENS, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["text"]
    assert chunks[-1].usage.completion_tokens == len(expected["tokens"])


def test_chat_on_a_text_bundle_equals_runtime_infer(client, serve_bundles, capsys):
    expected = infer_json(capsys, serve_bundles["llm"], "--prompt", "the quick brown")[0]
    reply = client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "the quick brown"}], max_tokens=TOKENS)
    assert reply.choices[0].message.content == expected["text"]
    stop = expected["text"][3:5]
    stopped = client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "the quick brown"}], max_tokens=TOKENS, stop=[stop])
    assert stopped.choices[0].message.content == expected["text"][: expected["text"].index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_features_equal_runtime_infer_and_concurrent_clips_are_batched(server, serve_bundles, audio_files, tmp_path, capsys, monkeypatch):
    url, engine = server
    run_main(infer_main, serve_bundles["wav2vec2"], "--audio", audio_files[0], "--output", tmp_path / "f.npz", "-q", capsys=capsys)
    expected = np.load(tmp_path / "f.npz")[audio_files[0].name]

    def post(path):
        with open(path, "rb") as handle:
            return httpx.post(f"{url}/v1/audio/features", data={"model": "wav2vec2"}, files={"file": (path.name, handle)}, timeout=SUBPROCESS_TIMEOUT_S)

    # The first clip's batch waits until all eight clips are in the batcher's queue, so the
    # other seven form the next batch together however the machine schedules the requests.
    submitted, all_in = [0], threading.Event()
    submit, encode = engine._audio_batch, engine.models["wav2vec2"].runner.encode

    def counted_submit(job):
        submitted[0] += 1
        if submitted[0] == 8:
            all_in.set()
        return submit(job)

    def held_encode(clips):
        assert all_in.wait(SUBPROCESS_TIMEOUT_S), "eight clips did not reach the batcher"
        return encode(clips)

    monkeypatch.setattr(engine, "_audio_batch", counted_submit)
    monkeypatch.setattr(engine.models["wav2vec2"].runner, "encode", held_encode)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, [audio_files[0]] * 8))
    assert all(r.status_code == 200 for r in responses)
    for response in responses:
        assert np.array_equal(np.load(io.BytesIO(response.content)), expected)
    metrics = httpx.get(f"{url}/metrics").text
    batches = [line for line in metrics.splitlines() if line.startswith('lalm_batch_size_count{model="wav2vec2"}')]
    clips = [line for line in metrics.splitlines() if line.startswith('lalm_batch_size_sum{model="wav2vec2"}')]
    assert float(clips[0].split()[-1]) >= float(batches[0].split()[-1]) + 6  # eight clips in at most two batches (and any earlier test's)
    with open(audio_files[0], "rb") as handle:
        as_json = httpx.post(f"{url}/v1/audio/features", data={"model": "wav2vec2", "response_format": "json"}, files={"file": handle}).json()
    decoded = np.frombuffer(base64.b64decode(as_json["data"]), dtype=np.float32).reshape(as_json["shape"])
    assert np.array_equal(decoded, expected)


def _wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16_000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _nan_wav() -> bytes:
    return _wav(np.full(16_000, np.nan, dtype=np.float32))


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda c, f: c.audio.transcriptions.create(model="nope", file=f), openai.NotFoundError, "the model 'nope' does not exist"),
        (lambda c, f: c.audio.transcriptions.create(model="llm", file=f), openai.BadRequestError, "llm is an decoder bundle"),
        (lambda c, f: c.audio.transcriptions.create(model="lalm", file=("a.wav", b"not audio")), openai.BadRequestError, "is not a readable audio file"),
        (lambda c, f: c.audio.transcriptions.create(model="lalm", file=("a.wav", _nan_wav())), openai.BadRequestError, "NaN or infinite samples"),
        (
            lambda c, f: c.audio.transcriptions.create(model="lalm", file=("short.wav", _wav(np.zeros(50, dtype=np.float32)))),
            openai.BadRequestError,
            "shorter than the encoder's receptive field",
        ),
        (lambda c, f: c.audio.transcriptions.create(model="lalm", file=f, response_format="xml"), openai.BadRequestError, "response_format must be one of"),
        (
            lambda c, f: c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6),
            openai.BadRequestError,
            "more than the decoder's context",
        ),
        (lambda c, f: c.chat.completions.create(model="lalm", messages=[{"role": "user", "content": "hi"}]), openai.BadRequestError, "exactly one input_audio"),
        (lambda c, f: c.chat.completions.create(model="llm", messages=[], temperature=-1), openai.BadRequestError, "messages must be a non-empty list"),
        (
            lambda c, f: c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}], temperature=-1),
            openai.BadRequestError,
            "temperature must be 0",
        ),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(client, audio_files, call, error, fragment):
    with open(audio_files[0], "rb") as handle, pytest.raises(error) as raised:
        call(client, handle)
    assert fragment in raised.value.body["message"] and raised.value.body["type"]
    assert client.models.list().data  # still serving


CHAT = b'{"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4'
JSON_BODIES = {
    "negative seed": (CHAT + b', "seed": -1}', "seed"),
    "seed past any integer": (CHAT + b', "seed": 1e400}', "seed must be a finite number"),
    "max_tokens past any integer": (CHAT.replace(b'"max_tokens": 4', b'"max_tokens": 1e400') + b"}", "max_tokens must be a finite number"),
    "max_tokens as a string": (CHAT.replace(b'"max_tokens": 4', b'"max_tokens": "5"') + b"}", "max_tokens must be a number"),
    "stream_options not an object": (CHAT + b', "stream": true, "stream_options": "x"}', "stream_options must be an object"),
    "logprobs": (CHAT + b', "logprobs": true}', "logprobs is not supported"),
    "tools": (CHAT + b', "tools": [{"type": "function", "function": {"name": "f"}}]}', "tools is not supported"),
    "json response_format": (CHAT + b', "response_format": {"type": "json_object"}}', "response_format"),
    "logit_bias": (CHAT + b', "logit_bias": {"5": 10}}', "logit_bias is not supported"),
    "presence_penalty": (CHAT + b', "presence_penalty": 0.5}', "presence_penalty is not supported"),
    "two choices": (CHAT + b', "n": 2}', "n must be 1"),
    "a role that is not a chat role": (CHAT.replace(b'"role": "user"', b'"role": "robot"') + b"}", "messages[0].role must be one of"),
    "a tool message": (CHAT.replace(b'"role": "user"', b'"role": "tool"') + b"}", "messages[0].role must be one of"),
    "a message without a role": (CHAT.replace(b'"role": "user", ', b"") + b"}", "messages[0].role must be one of"),
}


@pytest.mark.parametrize("case", sorted(JSON_BODIES))
def test_chat_parameters_out_of_range_or_not_implemented_are_400_naming_the_parameter(case, server):
    body, fragment = JSON_BODIES[case]
    answer = httpx.post(f"{server[0]}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert fragment in answer.json()["error"]["message"]


def test_text_that_is_not_unicode_and_an_upload_name_beyond_latin_1_are_not_500s(server, audio_files):
    url = server[0]
    audio = _audio_part(audio_files[0])
    lone_surrogate = '{"model": "lalm", "messages": [{"role": "user", "content": [{"type": "text", "text": "caf\\udce9"}, AUDIO]}]}'
    body = lone_surrogate.replace("AUDIO", json.dumps(audio)).encode()
    answer = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "not valid UTF-8" in answer.json()["error"]["message"], answer.text
    with open(audio_files[0], "rb") as handle:
        named = httpx.post(f"{url}/v1/audio/features", data={"model": "wav2vec2"}, files={"file": ("klänge-音声.wav", handle)})
    assert named.status_code == 200, named.text
    assert named.headers["content-disposition"].endswith("filename*=UTF-8''" + quote("klänge-音声.npy", safe=""))
    unreadable = httpx.post(f"{url}/v1/audio/features", data={"model": "wav2vec2"}, files={"file": ("notes.wav", b"not audio at all")})
    message = unreadable.json()["error"]["message"]
    assert unreadable.status_code == 400 and message.startswith("notes.wav is not a readable audio file") and "object at 0x" not in message


def test_an_unknown_path_and_a_wrong_method_are_openai_error_objects(server):
    missing = httpx.get(f"{server[0]}/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{server[0]}/v1/chat/completions")
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]


def test_body_over_the_limit_is_413_and_a_full_queue_is_503_with_retry_after(serve_bundles, monkeypatch):
    settings = ServeSettings(max_new_tokens=TOKENS, max_queue=1, max_body_mb=0.05)
    with running_server({"llm": serve_bundles["llm"]}, settings) as (url, engine):
        big = httpx.post(f"{url}/v1/chat/completions", content=b"{" + b" " * 100_000 + b"}", headers={"content-type": "application/json"})
        assert big.status_code == 413 and "over this server's limit" in big.json()["error"]["message"]
        chunks = (b"{" if i == 0 else b" " * 10_000 for i in range(100))  # no Content-Length: sent chunked
        chunked = httpx.post(f"{url}/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and "refused after" in chunked.json()["error"]["message"]
        # A request held in flight: the model waits for the gate.
        gate, entered, runner = threading.Event(), threading.Event(), engine.models["llm"].runner
        complete = runner.complete
        monkeypatch.setattr(runner, "complete", lambda *a, **k: (entered.set(), gate.wait(SUBPROCESS_TIMEOUT_S))[1] and complete(*a, **k))
        body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=SUBPROCESS_TIMEOUT_S)
            assert entered.wait(SUBPROCESS_TIMEOUT_S)  # admitted (admission comes first) and generating
            busy = httpx.post(f"{url}/v1/chat/completions", json=body)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
            gate.set()
            assert held.result().status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'lalm_rejected_total{reason="queue_full"} 1.0' in metrics
        assert 'lalm_requests_total{endpoint="/v1/chat/completions",status="413"} 2.0' in metrics
        assert 'lalm_requests_total{endpoint="/v1/chat/completions",status="200"} 2.0' in metrics


def test_a_short_generation_is_not_held_behind_a_long_one(serve_bundles, monkeypatch):
    """Decode steps are shared: a 4-token request sent while a 250-token one streams joins its
    batch and ends first."""
    decode_step = ScheduledBackend.decode_step

    def slow_decode_step(self, token_ids):  # 2 ms a step: the long one streams >= 0.5 s on any machine
        time.sleep(0.002)
        return decode_step(self, token_ids)

    monkeypatch.setattr(ScheduledBackend, "decode_step", slow_decode_step)
    with running_server({"llm": serve_bundles["llm"]}, ServeSettings(decode_slots=2)) as (url, _):
        body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 250}
        started, ends = threading.Event(), {}

        def stream_long() -> None:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=SUBPROCESS_TIMEOUT_S) as response:
                for index, _ in enumerate(response.iter_lines()):
                    if index == 2:  # the role chunk and a first token: under way
                        started.set()
            ends["long"] = time.perf_counter()

        long = threading.Thread(target=stream_long)
        long.start()
        assert started.wait(SUBPROCESS_TIMEOUT_S)
        short = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=SUBPROCESS_TIMEOUT_S)
        ends["short"] = time.perf_counter()
        long.join()
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4
        assert ends["short"] < ends["long"]


def test_generations_waiting_for_a_slot_leave_encoding_a_thread(serve_bundles, audio_files, monkeypatch):
    """With --decode-slots 1, one generation runs (held at its first decode step) and two wait
    for the slot. They wait on the event loop: a features request is answered meanwhile. (When
    they waited in the engine's threads, the encoder batch found none free until the gate opened;
    the timer below then opens it and the test fails instead of hanging.)"""
    gate, first_step, decode_step = threading.Event(), threading.Event(), ScheduledBackend.decode_step

    def held_decode_step(self, token_ids):
        first_step.set()
        gate.wait()
        return decode_step(self, token_ids)

    monkeypatch.setattr(ScheduledBackend, "decode_step", held_decode_step)
    failsafe = threading.Timer(120, gate.set)
    failsafe.start()
    try:
        with running_server({"llm": serve_bundles["llm"], "wav2vec2": serve_bundles["wav2vec2"]}, ServeSettings(decode_slots=1)) as (url, engine):
            body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}
            with ThreadPoolExecutor(3) as pool:
                chats = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=SUBPROCESS_TIMEOUT_S) for _ in range(3)]
                assert first_step.wait(SUBPROCESS_TIMEOUT_S)
                deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
                while engine.pending < 3:
                    assert time.monotonic() < deadline, f"only {engine.pending} of 3 chats were admitted"
                    time.sleep(0.01)
                with open(audio_files[0], "rb") as handle:
                    features = httpx.post(f"{url}/v1/audio/features", data={"model": "wav2vec2"}, files={"file": handle}, timeout=SUBPROCESS_TIMEOUT_S)
                answered_while_held = not gate.is_set()
                gate.set()
                assert [chat.result().status_code for chat in chats] == [200] * 3
    finally:
        failsafe.cancel()
    assert features.status_code == 200 and answered_while_held


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(serve_bundles, monkeypatch, capsys):
    """The drain, made deterministic: every decode step waits until the test has sent the signal
    (`handle_exit`, what SIGTERM calls in the command; the real signal reaches a child process in
    the test below), so the eight requests are surely in flight when it arrives."""
    signalled, decode_step = threading.Event(), ScheduledBackend.decode_step

    def held_decode_step(self, token_ids):
        assert signalled.wait(SUBPROCESS_TIMEOUT_S)
        return decode_step(self, token_ids)

    monkeypatch.setattr(ScheduledBackend, "decode_step", held_decode_step)
    with running_draining_server({"llm": serve_bundles["llm"]}, ServeSettings(decode_slots=2), grace_s=SUBPROCESS_TIMEOUT_S) as (url, engine, server):
        body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:
            in_flight = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=SUBPROCESS_TIMEOUT_S) for _ in range(8)]
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
            while engine.pending < 8:
                assert time.monotonic() < deadline, f"only {engine.pending} of 8 requests were admitted"
                time.sleep(0.01)
            server.handle_exit(signal.SIGTERM, None)
            health = httpx.get(f"{url}/health")
            assert health.status_code == 503 and health.json() == {"status": "draining", "in_flight": 8}
            refused = httpx.post(f"{url}/v1/chat/completions", json=body)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
            assert refused.headers["retry-after"] == "1" and not any(f.done() for f in in_flight)
            signalled.set()
            answers = [f.result() for f in in_flight]
        assert [a.status_code for a in answers] == [200] * 8
        assert all(a.json()["usage"]["completion_tokens"] == 6 for a in answers)
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not server.should_exit:  # the drain ends the server once the requests are answered
            assert time.monotonic() < deadline, "the server kept running after its requests were answered"
            time.sleep(0.01)
    assert "8 request(s) in flight get up to" in capsys.readouterr().err


def test_shutdown_delay_keeps_health_answering_draining_until_the_port_closes(serve_bundles):
    """A load balancer probing /health after SIGTERM sees 503 "draining" (not a refused
    connection) for --shutdown-delay; a second signal stops at once."""
    with serve_process(serve_bundles["llm"], "-q", "--shutdown-delay", "600") as (url, process):
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while (health := httpx.get(f"{url}/health")).status_code != 503:
            assert time.monotonic() < deadline, "/health never answered 503 after SIGTERM"
            time.sleep(0.01)
        assert health.json()["status"] == "draining" and health.headers["retry-after"] == "1"
        body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).json()["error"]["code"] == "server_shutting_down"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=SUBPROCESS_TIMEOUT_S) == 0
        assert "listening 600 s more" in process.stderr.read()


@pytest.mark.parametrize("flag", ["--shutdown-delay", "--shutdown-timeout"])
def test_shutdown_seconds_must_be_a_number_of_seconds(flag, serve_bundles, capsys):
    from runtime.serve import main as serve_main

    result = run_main(serve_main, serve_bundles["llm"], flag, "nan", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, f"{flag} must be a number of seconds")


def test_a_prefill_budget_under_one_position_is_one_line(serve_bundles, capsys):
    from runtime.serve import main as serve_main

    result = run_main(serve_main, serve_bundles["llm"], "--prefill-budget", "0", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "--prefill-budget must be at least 1, not 0")


@pytest.mark.parametrize("port, fragment", [("70000", "not a TCP port"), ("0", "not a TCP port"), ("http", "not a port number")])
def test_a_port_outside_1_to_65535_is_a_bad_flag(port, fragment, serve_bundles, capsys):
    from runtime.serve import main as serve_main

    result = run_main(serve_main, serve_bundles["llm"], "--port", port, capsys=capsys)
    assert result.returncode == 2
    assert_user_error(result, fragment)


def test_a_port_in_use_is_one_line_before_anything_loads(serve_bundles, capsys):
    from runtime.serve import main as serve_main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        result = run_main(serve_main, serve_bundles["llm"], "--port", held.getsockname()[1], capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "cannot listen on 127.0.0.1")


def test_a_bad_bundle_is_one_line_before_ray_starts(tmp_path, capsys):
    from runtime.serve import main as serve_main

    result = run_main(serve_main, tmp_path / "not-a-bundle", "--ray", capsys=capsys)
    assert result.returncode == 1
    assert_user_error(result, "does not exist")


def test_audio_too_long_by_its_header_is_refused_before_it_is_decoded(server, tmp_path):
    """40 KB whose header says 1 Hz are 40,000 s of audio: refused from the header, not after
    decoding and resampling them to hours of samples."""
    path = tmp_path / "one-hertz.wav"
    sf.write(path, np.zeros(40_000, dtype=np.int16), 1, format="WAV", subtype="PCM_16")
    with open(path, "rb") as handle:
        answer = httpx.post(f"{server[0]}/v1/audio/features", data={"model": "wav2vec2"}, files={"file": ("one-hertz.wav", handle)})
    assert answer.status_code == 400 and "by its header (40000 frames at 1 Hz)" in answer.json()["error"]["message"], answer.text


def _chat_with_audio(path, audio_format: str = "wav", role: str = "user") -> dict:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": audio_format}}
    return {"model": "lalm", "messages": [{"role": role, "content": [part]}], "max_tokens": 2}


def test_input_audio_must_be_in_a_user_message_and_in_the_format_it_says(server, audio_files, tmp_path):
    flac = tmp_path / "clip.flac"
    sf.write(flac, sf.read(audio_files[0])[0], 16_000, format="FLAC")
    cases = [
        (_chat_with_audio(flac, "wav"), "the format says wav, but the data is flac"),
        (_chat_with_audio(audio_files[0], "mp3"), "the format says mp3, but the data is wav"),
        (_chat_with_audio(audio_files[0], role="assistant"), "audio goes in a user message, not a assistant message"),
    ]
    for body, fragment in cases:
        answer = httpx.post(f"{server[0]}/v1/chat/completions", json=body)
        assert answer.status_code == 400 and fragment in answer.json()["error"]["message"], answer.text
    assert httpx.post(f"{server[0]}/v1/chat/completions", json=_chat_with_audio(flac, "flac")).status_code == 200


def test_a_request_without_max_tokens_may_use_the_rest_of_the_context(serve_bundles, audio_files):
    """vLLM's rule: no max_tokens is the decoder's context after the prompt, not a fixed number
    that may exceed it; --max-new-tokens caps it when the server sets one."""
    context = json.loads((serve_bundles["llm"] / "manifest.json").read_text())["extra"]["context_length"]
    body = {"model": "llm", "messages": [{"role": "user", "content": "hi there"}], "ignore_eos": True}
    with running_server({"llm": serve_bundles["llm"], "lalm": serve_bundles["lalm"]}, ServeSettings()) as (url, _):
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=SUBPROCESS_TIMEOUT_S).json()
        assert reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"] == context
        assert reply["choices"][0]["finish_reason"] == "length"
        spoken = httpx.post(
            f"{url}/v1/chat/completions", json={**_chat_with_audio(audio_files[0]), "max_tokens": None, "ignore_eos": True}, timeout=SUBPROCESS_TIMEOUT_S
        )
        lalm_context = json.loads((serve_bundles["lalm"] / "manifest.json").read_text())["extra"]["context_length"]
        assert spoken.json()["usage"]["total_tokens"] == lalm_context, spoken.text
    with running_server({"llm": serve_bundles["llm"]}, ServeSettings(max_new_tokens=3)) as (url, _):
        assert httpx.post(f"{url}/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole answer", "stream"])
def test_a_client_that_goes_away_ends_its_generation_at_the_next_step(stream, serve_bundles, monkeypatch):
    """The first decode step passes, any second one waits for a gate; the client hangs up
    meanwhile. It is no longer counted in flight, and once the gate opens its generation takes
    no further step."""
    steps, stepped, gate = [], threading.Event(), threading.Event()

    decode_step = ScheduledBackend.decode_step

    def gated_decode_step(self, token_ids):
        steps.append(id(self))  # which generation stepped
        stepped.set()
        if len(steps) > 1:
            gate.wait(SUBPROCESS_TIMEOUT_S)
        return decode_step(self, token_ids)

    monkeypatch.setattr(ScheduledBackend, "decode_step", gated_decode_step)
    with running_server({"llm": serve_bundles["llm"]}, ServeSettings(decode_slots=1)) as (url, engine):
        body = json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "ignore_eos": True, "stream": stream})
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as connection:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            connection.sendall(head.encode() + body.encode())
            assert stepped.wait(SUBPROCESS_TIMEOUT_S)
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while httpx.get(f"{url}/health").json()["in_flight"]:  # counted until the server hears the hang-up
            assert time.monotonic() < deadline, "the server did not hear the client hang up"
            time.sleep(0.01)
        gate.set()
        # Answered only once the gone client's generation has let go of the only slot
        assert (
            httpx.post(f"{url}/v1/chat/completions", json={**json.loads(body), "max_tokens": 2, "stream": False}, timeout=SUBPROCESS_TIMEOUT_S).status_code
            == 200
        )
        # the step under way when it hung up (if the hang-up was heard after it began), none after; 100 without the cancel
        assert steps.count(steps[0]) <= 2
