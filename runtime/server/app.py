"""The OpenAI-compatible HTTP API over an `Engine`.

- `GET /health`, `GET /v1/models`, `GET /metrics` (Prometheus)
- `POST /v1/audio/transcriptions` (LALM bundles; OpenAI's multipart form, SSE with `stream=true`)
- `POST /v1/chat/completions` (decoder and LALM bundles; `input_audio` parts for LALMs)
- `POST /v1/audio/features` (encoder bundles; not an OpenAI endpoint)

Errors are OpenAI error objects. Greedy decoding is the default (`temperature` 0), as in
`runtime.infer`: the same request gives the same text."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.audio import CONTAINERS, Audio, decode_audio
from runtime.chat import joined_content
from runtime.generation import GenerationOptions
from runtime.longform import Segment
from runtime.runners.lalm import Transcription
from runtime.runners.requests import CompletionRequest, TranscriptionRequest
from runtime.server.engine import Engine, ServedModel
from runtime.server.errors import ApiError, as_api_error, bad_request
from runtime.vad import SPLITTERS

TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
AUDIO_FORMATS = tuple(CONTAINERS)
# Chat roles this server takes; "tool" and "function" messages answer tool calls, which it does not make.
ROLES = ("system", "developer", "user", "assistant")


class BodyLimit:
    """The body limit for bodies that do not declare their length (chunked): counted as they
    arrive, and a 413 once past the limit, before the rest is read or parsed. Declared lengths
    are refused before any byte is read (`count_and_limit`)."""

    def __init__(self, app: Any, limit_bytes: int) -> None:
        self.app, self.limit_bytes = app, limit_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit_bytes:
                    raise _too_large(received, self.limit_bytes, declared=False)
            return message

        await self.app(scope, counted, send)


def build_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="lalm-export runtime", summary="OpenAI-compatible serving of lalm-export bundles (ONNX Runtime, no PyTorch)")
    app.state.engine = engine
    limit_bytes = int(engine.settings.max_body_mb * 1024 * 1024)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        """404 and 405 as OpenAI error objects, not FastAPI's {"detail": ...}."""
        if err.status_code == 404:
            code, message = "not_found", f"no endpoint {request.url.path}; see GET /v1/models and the endpoints in docs/serving.md"
        elif err.status_code == 405:
            code, message = "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
        else:
            code, message = None, str(err.detail)
        return JSONResponse(ApiError(err.status_code, message, code=code).body(), status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(bad_request(f"{where or 'request'}: {first.get('msg', 'invalid request')}", where).body(), status_code=400)

    app.add_middleware(BodyLimit, limit_bytes=limit_bytes)

    @app.middleware("http")
    async def count_and_limit(request: Request, call_next: Callable) -> Response:
        start = time.perf_counter()
        endpoint = request.url.path
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit_bytes:
            response: Response = _error_response(_too_large(int(declared), limit_bytes))
        else:
            response = await call_next(request)
        engine.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        engine.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.draining:
            return JSONResponse(
                {"status": "draining", "in_flight": engine.pending}, status_code=503, headers={"Retry-After": str(engine.settings.retry_after_s)}
            )
        return JSONResponse({"status": "ok", "models": list(engine.models), "in_flight": engine.pending})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model.card() for model in engine.models.values()]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/audio/features")
    async def features(request: Request) -> Response:
        form = await _form(request)
        model = engine.model(form.get("model"), ("encoder",), "/v1/audio/features")
        response_format = _choice(form.get("response_format") or "npy", ("npy", "json"), "response_format")
        audio = await _upload(form, limit_bytes, model.runner.limits)
        with engine.admission():
            encoded = await engine.encode(model, audio)
        array = np.ascontiguousarray(encoded.hidden_states, dtype=np.float32)
        if response_format == "json":
            return JSONResponse(
                {
                    "object": "audio.features",
                    "model": model.name,
                    "shape": list(array.shape),
                    "dtype": "float32",
                    "seconds": round(encoded.seconds, 3),
                    "data": base64.b64encode(array.tobytes()).decode("ascii"),
                }
            )
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        stem = audio.name.rsplit(".", 1)[0] or "audio"
        headers = {"Content-Disposition": _attachment(f"{stem}.npy"), "X-Shape": ",".join(map(str, array.shape))}
        return Response(buffer.getvalue(), media_type="application/octet-stream", headers=headers)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        form = await _form(request)
        model = engine.model(form.get("model"), ("lalm",), "/v1/audio/transcriptions")
        response_format = _choice(form.get("response_format") or "json", TRANSCRIPTION_FORMATS, "response_format")
        stream = _flag(form.get("stream"), "stream")
        split = _choice(form.get("split"), SPLITTERS, "split") if form.get("split") else None  # this server's extension: how long audio is cut
        options, asked = _options({"temperature": form.get("temperature")})
        prompt = _lalm_prompt(form.get("prompt"))
        data, name = await _upload_bytes(form, limit_bytes)
        release = engine.admit()
        try:
            work = await engine.transcription(model, data, name, prompt, options, asked, split)
        except BaseException:
            release()
            raise
        result = await _answer(request, engine, model, work, release, stream, lambda delta: {"type": "transcript.text.delta", "delta": delta}, _transcript_done)
        if isinstance(result, Response):
            return result
        return _transcription_response(result, response_format, str(form.get("language") or "unknown"), options.temperature)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _json_body(request)
        _refuse_unimplemented(body)
        model = engine.model(body.get("model"), ("decoder", "lalm"), "/v1/chat/completions")
        prompt, clip = _chat_prompt(model, body.get("messages"))
        options, asked = _options(body, json_body=True)
        stop = _stop(body.get("stop"))
        stream = _flag(body.get("stream"), "stream")
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise bad_request(f'stream_options must be an object such as {{"include_usage": true}}, not {stream_options!r}', "stream_options")
        include_usage = _flag((stream_options or {}).get("include_usage"), "stream_options.include_usage") if stream else False
        chat_request = as_api_error(
            lambda: CompletionRequest(prompt, options, tuple(stop)) if clip is None else TranscriptionRequest(clip, prompt, options, tuple(stop))
        )
        release = engine.admit()
        try:
            generation = await engine.prepare(model, chat_request, asked)
        except BaseException:
            release()
            raise
        chat = ChatReply(model.name, generation.options.max_new_tokens, include_usage, model.runner.eos_token_id)
        result = await _answer(
            request, engine, model, lambda on_text: engine.generate(model, generation, on_text), release, stream, chat.delta, chat.done, first=chat.role_chunk()
        )
        if isinstance(result, Response):
            return result
        return JSONResponse(chat.completion(result))

    return app


# --- request parsing --------------------------------------------------------------------


async def _form(request: Request) -> Any:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("send the request as multipart/form-data with the audio in the `file` field")
    try:
        return await request.form()
    except ApiError:
        raise  # the body limit, hit while the form was read
    except Exception as err:  # python-multipart's parse errors have no common base
        raise bad_request(f"the multipart body could not be read: {err}") from None


async def _upload_bytes(form: Any, limit_bytes: int) -> tuple[bytes, str]:
    """The `file` field's bytes and name."""
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise bad_request("no audio: send the audio file in the `file` field", "file")
    data = await upload.read()
    if len(data) > limit_bytes:
        raise _too_large(len(data), limit_bytes)
    return data, upload.filename or "upload"


async def _upload(form: Any, limit_bytes: int, limits: Any) -> Audio:
    data, name = await _upload_bytes(form, limit_bytes)
    return as_api_error(lambda: decode_audio(data, name, limits), "file")


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _choice(value: object, choices: tuple[str, ...], param: str) -> str:
    if value not in choices:
        raise bad_request(f"{param} must be one of {', '.join(choices)}, not {value!r}", param)
    return str(value)


def _flag(value: object, param: str) -> bool:
    if value in (None, False, "false", "False", "0", ""):
        return False
    if value in (True, "true", "True", "1"):
        return True
    raise bad_request(f"{param} must be true or false, not {value!r}", param)


def _number(value: object, param: str, default: float | None, kind: type = float, json_body: bool = False) -> Any:
    """A finite number; in a JSON body a JSON number (a form field arrives as text)."""
    if value is None or (value == "" and not json_body):
        return default
    if isinstance(value, bool) or (json_body and not isinstance(value, (int, float))):
        raise bad_request(f"{param} must be a number, not {value!r}", param)
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise bad_request(f"{param} must be a finite number, not {value!r}", param) from None
    if not math.isfinite(number):
        raise bad_request(f"{param} must be a finite number, not {value!r}", param)
    if kind is int and isinstance(value, float) and value != number:
        raise bad_request(f"{param} must be a whole number, not {value!r}", param)
    return number


def _options(fields: dict[str, Any], json_body: bool = False) -> tuple[GenerationOptions, int | None]:
    """The request's sampling options and the token budget it asked for (None: it did not say;
    the options then hold 1 until the prompt's length sets the budget, `Engine.budgeted`)."""
    max_tokens = fields.get("max_completion_tokens", fields.get("max_tokens"))
    seed = _number(fields.get("seed"), "seed", None, int, json_body)  # its range: GenerationOptions.validate
    asked = _number(max_tokens, "max_tokens", None, int, json_body)
    options = GenerationOptions(
        max_new_tokens=1 if asked is None else asked,
        stop_at_eos=not _flag(fields.get("ignore_eos"), "ignore_eos"),  # vLLM's extension: generate past EOS
        temperature=_number(fields.get("temperature"), "temperature", 0.0, float, json_body),
        top_p=_number(fields.get("top_p"), "top_p", 1.0, float, json_body),
        seed=seed,
    )
    as_api_error(options.validate)
    return options, asked


# OpenAI parameters this server does not implement: a 400 naming them, not a 200 that ignores them.
UNIMPLEMENTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "logit_bias", "presence_penalty", "frequency_penalty")


def _refuse_unimplemented(body: dict[str, Any]) -> None:
    for param in UNIMPLEMENTED:
        if body.get(param) not in (None, False, 0, [], {}):
            raise bad_request(f"{param} is not supported by this server; leave it out", param, code="unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_request(
            f"response_format {response_format!r} is not supported: this server answers plain text", "response_format", code="unsupported_parameter"
        )
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise bad_request(f"n must be 1: one choice per request, not {n!r}", "n", code="unsupported_parameter")


def _stop(value: object) -> list[str]:
    stops = [value] if isinstance(value, str) else value if isinstance(value, list) else [] if value is None else None
    if stops is None or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad_request("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def _lalm_prompt(prompt: object) -> str | None:
    """The transcription's prompt: the bundle's when none is given, else the text as
    `runtime.infer --prompt` takes it (`LalmRunner.resolve` applies the rule)."""
    if prompt is None or prompt == "":
        return None
    if not isinstance(prompt, str):
        raise bad_request("prompt must be text", "prompt")
    return prompt


def _chat_prompt(model: ServedModel, messages: object) -> tuple[str, Audio | None]:
    """The prompt of a chat: formatted by the bundle's chat template where it has one (an audio
    LLM checkpoint's), the `input_audio` part as the template's audio part; else the messages'
    text parts joined in order (messages by newlines, parts of one message directly), what
    `runtime.infer --prompt` would get, the one `input_audio` part as the audio placeholder."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    clips, turns = [], []
    token = model.runner.audio_token
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "content" not in message:
            raise bad_request(f"messages[{index}] must be an object with role and content", f"messages[{index}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{index}].role must be one of {', '.join(ROLES)}, not {role!r}", f"messages[{index}].role")
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise bad_request(f"messages[{index}].content must be text or a list of parts", f"messages[{index}].content")
        turn = []
        for part_index, part in enumerate(parts):
            where = f"messages[{index}].content[{part_index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                turn.append({"type": "text", "text": part["text"]})
            elif kind == "input_audio":
                if role != "user":
                    raise bad_request(f"{where}: audio goes in a user message, not a {role} message", where)
                if token is None:
                    raise bad_request(f"{where}: {model.name} is a text bundle; audio needs an audio LLM bundle", where)
                clips.append(_input_audio(part.get("input_audio"), where, model.runner.limits))
                turn.append({"type": "audio"})
            else:
                raise bad_request(f"{where}: a part must be {{type: text, text}} or {{type: input_audio, input_audio: {{data, format}}}}", where)
        turns.append({"role": role, "content": turn})
    if token is not None and len(clips) != 1:
        raise bad_request(f"an audio LLM request takes exactly one input_audio part, not {len(clips)}", "messages")
    template = model.runner.chat_template
    if template is None:
        return "\n".join(joined_content(turn["content"], token) for turn in turns), (clips[0] if clips else None)
    prompt = as_api_error(lambda: template.render(turns), "messages")
    if prompt.count(token) != 1:
        raise bad_request(f"the bundle's chat template wrote the audio placeholder {prompt.count(token)} times for one input_audio part", "messages")
    return prompt, clips[0]


def _input_audio(spec: object, where: str, limits: Any) -> Audio:
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise bad_request(f"{where}.input_audio must be {{data: base64, format}}", where)
    audio_format = spec.get("format", "wav")
    if audio_format not in AUDIO_FORMATS:
        raise bad_request(f"{where}.input_audio.format must be one of {', '.join(AUDIO_FORMATS)}, not {audio_format!r}", where)
    try:
        data = base64.b64decode(spec["data"], validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}.input_audio.data is not valid base64", where) from None
    return as_api_error(lambda: decode_audio(data, f"{where}.input_audio", limits, audio_format), where)


def _too_large(size: int, limit: int, declared: bool = True) -> ApiError:
    """413 for a body past `limit`: its declared `size`, or (a chunked body) the bytes read when it passed the limit."""
    if declared:
        message = f"the request body is {size / 2**20:.1f} MiB, over this server's limit of {limit / 2**20:g} MiB (--max-body-mb)"
    else:
        message = f"the request body is over this server's limit of {limit / 2**20:g} MiB (--max-body-mb); refused after {size:,} bytes"
    return ApiError(413, message, code="request_too_large")


def _attachment(filename: str) -> str:
    """A Content-Disposition header for any file name: headers are Latin-1, so an ASCII
    stand-in and the UTF-8 name percent-encoded (RFC 6266)."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(filename, safe='')}"


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# --- responses ----------------------------------------------------------------------------


def _transcription_response(result: Transcription, response_format: str, language: str, temperature: float) -> Response:
    """OpenAI's transcription answer in `response_format`: json, text, verbose_json (with its
    segments: id, seek, start, end, text, tokens, temperature), srt or vtt (a cue per segment)."""
    if response_format == "text":
        return PlainTextResponse(result.text)
    if response_format in ("srt", "vtt"):
        return PlainTextResponse(subtitles(result.segments, response_format), media_type="text/vtt" if response_format == "vtt" else "application/x-subrip")
    body: dict[str, Any] = {"text": result.text, "usage": _transcription_usage(result)}
    if response_format == "verbose_json":
        segments = [{**asdict(segment), "seek": int(segment.start * 100), "temperature": temperature} for segment in result.segments]
        body.update(
            task="transcribe",
            language=language,
            duration=result.audio_s,
            segments=segments,
            tokens=result.tokens,
            time_to_first_token_s=result.time_to_first_token_s,
            tokens_per_s=result.tokens_per_s,
            timings=result.timings,
        )
    return JSONResponse(body)


def subtitles(segments: Sequence[Segment], kind: str) -> str:
    """SubRip (`srt`) or WebVTT (`vtt`) text: one cue per segment with text."""
    separator = "," if kind == "srt" else "."

    def stamp(seconds: float) -> str:
        millis = int(round(seconds * 1000))
        return f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}{separator}{millis % 1000:03d}"

    cues = [segment for segment in segments if segment.text]
    lines = [] if kind == "srt" else ["WEBVTT", ""]
    for number, segment in enumerate(cues, 1):
        lines += ([str(number)] if kind == "srt" else []) + [f"{stamp(segment.start)} --> {stamp(segment.end)}", segment.text, ""]
    return "\n".join(lines)


def _transcription_usage(result: Any) -> dict[str, Any]:
    return {
        "type": "tokens",
        "input_tokens": result.prompt_tokens,
        "output_tokens": len(result.tokens),
        "total_tokens": result.prompt_tokens + len(result.tokens),
    }


def _transcript_done(result: Any) -> list[dict[str, Any]]:
    return [{"type": "transcript.text.done", "text": result.text, "usage": _transcription_usage(result)}]


class ChatReply:
    """OpenAI's chat completion objects for one request (one id, one creation time)."""

    def __init__(self, model: str, max_tokens: int, include_usage: bool, eos_token_id: int | None) -> None:
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.max_tokens, self.include_usage, self.eos_token_id = max_tokens, include_usage, eos_token_id

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": [choice]}

    def role_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, None)

    def finish_reason(self, result: Any) -> str:
        """`length` when the token budget ran out before EOS or a stop string; `stop` otherwise."""
        ran_out = len(result.tokens) >= self.max_tokens and result.tokens[-1] != self.eos_token_id
        return "length" if ran_out else "stop"

    def usage(self, result: Any) -> dict[str, int]:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens), "total_tokens": result.prompt_tokens + len(result.tokens)}

    def done(self, result: Any) -> list[dict[str, Any]]:
        events = [self._chunk({}, self.finish_reason(result))]
        if self.include_usage:
            events.append({**self._chunk({}, None), "choices": [], "usage": self.usage(result)})
        return events

    def completion(self, result: Any) -> dict[str, Any]:
        message = {"role": "assistant", "content": result.text}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason(result)}],
            "usage": self.usage(result),
        }


# The status logged and counted for a request whose client went away before its answer (nginx's).
CLIENT_GONE = 499


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away: the body has been read, so all that can still
    arrive is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


Work = Callable[[Callable[[str], None] | None], Awaitable[Any]]  # the request's work, told its text as it comes


async def _answer(
    request: Request,
    engine: Engine,
    model: ServedModel,
    work: Work,
    release: Callable[[], None],
    stream: bool,
    delta_event: Callable[[str], dict[str, Any]],
    done_events: Callable[[Any], list[dict[str, Any]]],
    first: dict[str, Any] | None = None,
) -> Any:
    """The work's result (a generation, or a long recording's), or with `stream` an SSE response;
    the admission is released when the result is there or the stream ends. A client that goes
    away cancels the work (a generation ends at its next step) and is answered 499, which nobody
    reads but the metrics."""
    if stream:
        return StreamingResponse(_stream(request, engine, model, work, delta_event, done_events, release, first), media_type="text/event-stream")
    try:
        result = await _unless_gone(request, work(None))
    finally:
        release()
    if not isinstance(result, Response):
        engine.record_generation(model, len(result.tokens), result.time_to_first_token_s, result.tokens_per_s)
    return result


async def _unless_gone(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or 499 when the client goes away first (the work is cancelled: a
    generation then ends at its next step)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            return Response(status_code=CLIENT_GONE)
        return task.result()
    finally:
        gone.cancel()


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _stream(
    request: Request,
    engine: Engine,
    model: ServedModel,
    work: Work,
    delta_event: Callable[[str], dict[str, Any]],
    done_events: Callable[[Any], list[dict[str, Any]]],
    release: Callable[[], None],
    first: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """Server-sent events of one generation: text deltas as they come, then the closing
    events and `[DONE]`; an error after the first event is sent as an error event. A client
    that goes away cancels the generation."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    task: asyncio.Future | None = None
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        task = asyncio.ensure_future(work(lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)))
        task.add_done_callback(lambda _: deltas.put_nowait(None))
        gone.add_done_callback(lambda _: task.cancel())  # not only when the next event fails to send: it may be minutes away
        if first is not None:
            yield _sse(first)
        while (text := await deltas.get()) is not None:
            yield _sse(delta_event(text))
        if task.cancelled():
            return
        try:
            result = task.result()
        except ApiError as err:
            yield _sse(err.body())
        else:
            engine.record_generation(model, len(result.tokens), result.time_to_first_token_s, result.tokens_per_s)
            for event in done_events(result):
                yield _sse(event)
        yield _sse("[DONE]")
    finally:
        gone.cancel()
        if task is not None and not task.done():
            task.cancel()
        release()
