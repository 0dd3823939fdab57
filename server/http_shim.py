"""The OpenAI-style HTTP API (Starlette app, uvicorn server) over a generation backend.

The backend is the in-process `GenerationCore` when `loraplex serve` runs the shim next to gRPC, or a
`RemoteBackend` (server/remote_backend.py) when `loraplex http-shim --grpc-target HOST:PORT` runs it
alone in front of a remote server; the shim itself only translates JSON to `GenerateCall`s and
`GeneratedToken`s to JSON, and forwards `Authorization: Bearer KEY` to the backend, which checks it.

Endpoints: GET /health (the process answers), GET /ready (the backend takes requests; 503 otherwise),
GET /v1/models (the base and every adapter the key may use), POST /v1/completions and
POST /v1/chat/completions, each unary or streamed as server-sent events ending in `data: [DONE]`,
and vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (scope "admin").
`model` names the base (its folder name, or "") or an adapter ("NAME" or "NAME@VERSION").
Supported: max_tokens / max_completion_tokens, temperature, top_p, seed, stop (a string or a list,
matched on the decoded text), n (choice i samples with seed + i when a seed is given), logprobs and
top_logprobs (chat: a flag and a count; completions: a count), presence_penalty / frequency_penalty,
stream (one event per token and choice when no stop string is set), stream_options.include_usage, and
vLLM's ignore_eos; unknown parameters are ignored. Errors have OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. A client that disconnects frees its sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.adapters.errors import MAX_SHOWN_CHARS
from loraplex.server import errors
from loraplex.server.engine import MAX_TOP_LOGPROBS, FinishReason
from loraplex.server.errors import AdapterNotFound, InvalidRequest, RequestError, TooLarge
from loraplex.server.generation import (
    ChatMessage,
    GenerateCall,
    GeneratedToken,
    ModelList,
    StopGeneration,
)
from loraplex.server.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id
from loraplex.server.settings import MAX_REQUEST_BYTES

log = logging.getLogger(__name__)

#: HTTP status and OpenAI error type of each refusal.
HTTP_ERRORS: dict[type[RequestError], tuple[int, str]] = {
    errors.InvalidRequest: (400, "invalid_request_error"),
    errors.FailedPrecondition: (400, "invalid_request_error"),
    errors.Unauthenticated: (401, "authentication_error"),
    errors.PermissionDenied: (403, "permission_error"),
    errors.AdapterNotFound: (404, "not_found_error"),
    errors.TooLarge: (413, "invalid_request_error"),
    errors.Overloaded: (429, "rate_limit_error"),
    errors.ShuttingDown: (503, "service_unavailable"),
    errors.GenerationFailed: (500, "server_error"),
}
FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
SURROGATE = re.compile("[\ud800-\udfff]")
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
PARAMS = {"max_new_tokens": "max_tokens", "prompt": "prompt", "chat": "messages"}
"""GenerateCall's field names as the OpenAI body spells them (in errors' `param`)."""
ADMIN_PARAMS = {"name": "lora_name", "source": "lora_path"}
"""The admin calls' field names as vLLM's load/unload bodies spell them."""


class Backend(Protocol):
    """Where the model runs: GenerationCore (in process) or RemoteBackend (a loraplex gRPC server).
    `authorization` is the caller's header value ("Bearer KEY"); the backend authenticates it."""

    def generate(self, authorization: str | None, call: GenerateCall) -> AsyncIterator[GeneratedToken]: ...

    async def ready(self) -> bool: ...

    async def models(self, authorization: str | None) -> ModelList: ...

    async def load_adapter(self, authorization: str | None, name: str, source: str) -> str: ...

    async def unload_adapter(self, authorization: str | None, name: str) -> list[str]: ...


class MetricsSource(Protocol):
    """Where /metrics comes from (GenerationCore): the exposition, if the caller's key may read it."""

    async def exposition(self, authorization: str | None) -> bytes: ...


@dataclass(frozen=True)
class Piece:
    """One step of one choice: the text it adds and the tokens behind it; the last one has the finish
    reason and the choice's token counts."""

    text: str
    tokens: tuple[GeneratedToken, ...]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Answer:
    """How one request is answered: the call of each choice and the wire options around it."""

    calls: list[GenerateCall]
    stops: tuple[str, ...]
    chat: bool
    model: str
    stream: bool
    include_usage: bool


class HttpShim:
    """The Starlette app over one backend; `app` is the ASGI application."""

    def __init__(self, backend: Backend, metrics: MetricsSource | None = None,
                 max_body_bytes: int = MAX_REQUEST_BYTES) -> None:
        """`metrics`: served at GET /metrics (Prometheus text format, to keys with scope "metrics" or
        "admin") when given; a request body over `max_body_bytes` is refused with 413 (TooLarge) as soon as
        it is known to be."""
        self._backend, self._metrics, self._max_body_bytes = backend, metrics, max_body_bytes
        routes = [
            Route("/health", self.health), Route("/ready", self.ready), Route("/v1/models", self.models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"]),
        ]
        if metrics is not None:
            routes.append(Route("/metrics", self.metrics))
        self.app = RequestIds(Starlette(routes=routes, exception_handlers={
            RequestError: _error_response, json.JSONDecodeError: _bad_json, Exception: _error_response}))

    async def metrics(self, request: HttpRequest) -> Response:
        return Response(await self._metrics.exposition(_authorization(request)), media_type=CONTENT_TYPE_LATEST)

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: HttpRequest) -> Response:
        if await self._backend.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "unavailable"}, 503)

    async def models(self, request: HttpRequest) -> Response:
        listed = await self._backend.models(_authorization(request))
        card = {"object": "model", "created": 0, "owned_by": "loraplex"}
        base = [{"id": listed.base, **card}] if listed.base is not None else []
        adapters = [{"id": name, **card, "parent": listed.base, "version": version}
                    for name, version in listed.adapters]
        return JSONResponse({"object": "list", "data": base + adapters})

    async def completions(self, request: HttpRequest) -> Response:
        body = await self._json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not (isinstance(prompt, str) and prompt) and not (
                isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt)):
            raise InvalidRequest("prompt", "must be a non-empty string, or a list of token ids")
        top = _optional_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        return await self._answer(request, body, prompt, chat=False, logprobs=top is not None, top_logprobs=top or 0)

    async def chat_completions(self, request: HttpRequest) -> Response:
        body = await self._json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise InvalidRequest("messages", "must be a non-empty list of {role, content} with string content")
        logprobs = _flag(body, "logprobs")
        top = _optional_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        prompt = [ChatMessage(m["role"], m["content"]) for m in messages]
        return await self._answer(request, body, prompt, chat=True, logprobs=logprobs, top_logprobs=top or 0)

    async def load_lora_adapter(self, request: HttpRequest) -> Response:
        """vLLM's endpoint: {"lora_name", "lora_path"} -> AdapterAdmin.LoadAdapter (scope "admin")."""
        body = await self._json_body(request)
        name, path = _string(body, "lora_name"), _string(body, "lora_path")
        try:
            version = await self._backend.load_adapter(_authorization(request), name, path)
        except InvalidRequest as error:
            raise error.renamed(ADMIN_PARAMS) from None
        return JSONResponse({"lora_name": name, "version": version})

    async def unload_lora_adapter(self, request: HttpRequest) -> Response:
        """vLLM's endpoint: {"lora_name"} -> AdapterAdmin.UnloadAdapter without waiting (scope "admin")."""
        name = _string(await self._json_body(request), "lora_name")
        try:
            removed = await self._backend.unload_adapter(_authorization(request), name)
        except InvalidRequest as error:
            raise error.renamed(ADMIN_PARAMS) from None
        return JSONResponse({"lora_name": name, "removed_versions": removed})

    async def _json_body(self, request: HttpRequest) -> dict:
        """The body as a JSON object, read up to the size limit: UTF-8, and no string in it (key or value)
        holds a lone surrogate (an escaped half of a UTF-16 pair, which no tokenizer can encode)."""
        try:
            text = (await self._read_body(request)).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidRequest("body", f"is not UTF-8 ({error.reason} at byte {error.start})") from None
        body = json.loads(text)
        if not isinstance(body, dict):
            raise InvalidRequest("body", "must be a JSON object")
        for name, value in body.items():
            if _has_surrogate(name) or _has_surrogate(value):
                field = name if len(name) <= MAX_SHOWN_CHARS and not _has_surrogate(name) else "body"
                raise InvalidRequest(field, "holds a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode")
        return body

    async def _read_body(self, request: HttpRequest) -> bytes:
        """The raw body; TooLarge once its Content-Length or the bytes read so far exceed the limit."""
        limit = self._max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"the body has {declared} bytes; this server accepts at most {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the body has more than {limit} bytes, the most this server accepts")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _answer(self, request: HttpRequest, body: dict, prompt: str | list[int] | list[ChatMessage],
                      chat: bool, logprobs: bool, top_logprobs: int) -> Response:
        """Start every choice, then answer in one JSON document or as an event stream."""
        answer = _decode(body, prompt, chat, logprobs, top_logprobs)
        authorization = _authorization(request)
        choices = [self._pieces(self._backend.generate(authorization, call), answer.stops) for call in answer.calls]
        try:  # refusals (unknown model, overload, bad parameter) surface here, before any byte is sent
            firsts = await asyncio.gather(*(anext(choice) for choice in choices))
        except BaseException:
            await asyncio.gather(*(choice.aclose() for choice in choices), return_exceptions=True)
            raise
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if answer.stream:
            return StreamingResponse(_events(answer, firsts, choices, ident, created), media_type="text/event-stream")
        pieces = await asyncio.gather(*(_rest(first, choice) for first, choice in zip(firsts, choices, strict=True)))
        rendered = [_choice(answer, index, _joined(choice_pieces), final=True)
                    for index, choice_pieces in enumerate(pieces)]
        return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": answer.model, "choices": rendered,
                             "usage": _usage([choice_pieces[-1] for choice_pieces in pieces])})

    async def _pieces(self, tokens: AsyncIterator[GeneratedToken], stops: tuple[str, ...]) -> AsyncIterator[Piece]:
        """One choice's pieces: its text as it comes, cut at the first stop string (held back while one may
        still be forming); the last piece finishes. Field names in refusals are the OpenAI body's."""
        held, held_tokens, generated, holdback = "", [], 0, max(map(len, stops), default=1) - 1
        prompt_tokens = 0
        try:
            async for token in tokens:
                generated += 1
                prompt_tokens = token.prompt_tokens or prompt_tokens
                held += token.text
                held_tokens.append(token)
                cut = min((i for i in (held.find(stop) for stop in stops) if i >= 0), default=-1)
                if cut >= 0 and token.completion is None:  # the generation ends here, as finished
                    with contextlib.suppress(StopAsyncIteration):
                        await tokens.athrow(StopGeneration())
                if cut >= 0 or token.completion is not None:
                    reason = "stop" if cut >= 0 else FINISH[token.completion.finish_reason]
                    yield Piece(held[:cut] if cut >= 0 else held, tuple(held_tokens), reason, prompt_tokens, generated)
                    return
                if not stops:  # one piece per token, as gRPC streams (its text may be empty)
                    yield Piece(held, tuple(held_tokens))
                    held, held_tokens = "", []
                elif len(held) > holdback:
                    emit, held = held[:len(held) - holdback], held[len(held) - holdback:]
                    yield Piece(emit, tuple(held_tokens))
                    held_tokens = []
        except InvalidRequest as error:
            raise error.renamed(PARAMS) from None
        finally:  # done, stopped by a stop string, or the client went away: free the sequence
            await tokens.aclose()


def _decode(body: dict, prompt: str | list[int] | list[ChatMessage], chat: bool, logprobs: bool,
            top_logprobs: int) -> Answer:
    """The body's GenerateCall for each of its `n` choices and the answer's wire options."""
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidRequest("model", "must be a string")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = {"temperature": _number(body, "temperature", 1.0), "top_p": _number(body, "top_p", 1.0),
                "presence_penalty": _number(body, "presence_penalty", 0.0),
                "frequency_penalty": _number(body, "frequency_penalty", 0.0)}
    seed = _optional_int(body, "seed", -(2**63), 2**64 - 1)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
    if (stop is not None and not isinstance(stop, str | list)) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"must be a non-empty string or a list of up to {MAX_STOP_STRINGS}")
    n = _optional_int(body, "n", 1, MAX_CHOICES) or 1
    call = GenerateCall(adapter=model, prompt=prompt, max_new_tokens=None if max_tokens is None else
                        _int(max_tokens, "max_tokens"), sampling=sampling, ignore_eos=_flag(body, "ignore_eos"),
                        logprobs=logprobs, top_logprobs=top_logprobs)
    calls = [replace(call, sampling={**sampling, "seed": (seed + i) % 2**64}) if seed is not None else call
             for i in range(n)]
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise InvalidRequest("stream_options", "must be an object")
    return Answer(calls, stops, chat, model, _flag(body, "stream"), _flag(stream_options, "include_usage"))


async def _rest(first: Piece, choice: AsyncIterator[Piece]) -> list[Piece]:
    """Every piece of one choice, `first` included; the choice is closed also if the client goes away."""
    pieces = [first]
    try:
        async for piece in choice:
            pieces.append(piece)
    finally:
        await choice.aclose()
    return pieces


def _joined(pieces: Sequence[Piece]) -> Piece:
    last = pieces[-1]
    return Piece("".join(p.text for p in pieces), tuple(t for p in pieces for t in p.tokens), last.finish_reason,
                 last.prompt_tokens, last.completion_tokens)


async def _events(answer: Answer, firsts: list[Piece], choices: list[AsyncIterator[Piece]], ident: str,
                  created: int) -> AsyncIterator[str]:
    """The SSE frames of one streamed answer (each choice's role first for chat), then the usage chunk if
    asked, then [DONE]."""
    kind = "chat.completion.chunk" if answer.chat else "text_completion"
    lasts = list(firsts)
    offsets = [0] * len(choices)

    def frame(payload: dict) -> str:
        header = {"id": ident, "object": kind, "created": created, "model": answer.model}
        return f"data: {json.dumps({**header, **payload})}\n\n"

    def chunk(index: int, piece: Piece) -> str:
        lasts[index] = piece
        rendered = _choice(answer, index, piece, final=False, offset=offsets[index])
        offsets[index] += len(piece.text)
        return frame({"choices": [rendered]})

    try:
        if answer.chat:
            for index in range(len(choices)):
                yield frame({"choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
        for index, first in enumerate(firsts):
            yield chunk(index, first)
        async for index, piece in _merged([choice for choice, first in zip(choices, firsts, strict=True)
                                           if first.finish_reason is None],
                                          [i for i, first in enumerate(firsts) if first.finish_reason is None]):
            yield chunk(index, piece)
    except Exception as error:  # the status line is sent: the failure is the last event (no [DONE])
        if not isinstance(error, RequestError):
            log.error("streamed answer failed", exc_info=error)
        yield f"data: {json.dumps(_error_body(error)[1])}\n\n"
        return
    finally:  # a client that disconnects mid-stream frees its sequences
        await asyncio.gather(*(choice.aclose() for choice in choices), return_exceptions=True)
    if answer.include_usage:
        yield frame({"choices": [], "usage": _usage(lasts)})
    yield "data: [DONE]\n\n"


async def _merged(choices: list[AsyncIterator[Piece]], indices: list[int]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) as each choice produces them; one choice is iterated directly (no tasks)."""
    if len(choices) == 1:
        async for piece in choices[0]:
            yield indices[0], piece
        return
    queue: asyncio.Queue[tuple[int, Piece | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, choice: AsyncIterator[Piece]) -> None:
        try:
            async for piece in choice:
                await queue.put((index, piece))
            await queue.put((index, None))
        except BaseException as error:  # re-raised by the consumer (cancellation included)
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(index, choice)) for index, choice in zip(indices, choices, strict=True)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _choice(answer: Answer, index: int, piece: Piece, final: bool, offset: int = 0) -> dict:
    """One rendered choice: a whole message (`final`, unary answers) or a streamed delta."""
    logprobs = _logprobs(answer, piece, offset) if answer.calls[index].logprobs else None
    if not answer.chat:
        return {"index": index, "text": piece.text, "finish_reason": piece.finish_reason, "logprobs": logprobs}
    if final:
        content = {"message": {"role": "assistant", "content": piece.text}}
    else:
        content = {"delta": {"content": piece.text} if piece.text else {}}
    return {"index": index, **content, "logprobs": logprobs, "finish_reason": piece.finish_reason}


def _logprobs(answer: Answer, piece: Piece, offset: int) -> dict:
    """The piece's tokens in OpenAI's logprobs shape: completions' parallel lists, or chat's content list."""
    tokens = piece.tokens
    if not answer.chat:  # completions' shape: parallel lists
        offsets, position = [], offset
        for token in tokens:
            offsets.append(position)
            position += len(token.text)
        top = [{alt.piece: alt.logprob for alt in token.top_logprobs} for token in tokens]
        return {"tokens": [t.piece for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": top if answer.calls[0].top_logprobs else None, "text_offset": offsets}

    def entry(piece_text: str, logprob: float) -> dict:
        return {"token": piece_text, "logprob": logprob, "bytes": list(piece_text.encode())}

    return {"content": [{**entry(t.piece, t.logprob), "top_logprobs": [entry(a.piece, a.logprob)
                                                                        for a in t.top_logprobs]}
                        for t in tokens]}


def _usage(lasts: Sequence[Piece]) -> dict[str, int]:
    prompt, completion = lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _authorization(request: HttpRequest) -> str | None:
    return request.headers.get("authorization")


def _has_surrogate(value: object) -> bool:
    """Whether a JSON value holds a string (key or value, at any depth) with a lone surrogate."""
    if isinstance(value, str):
        return SURROGATE.search(value) is not None
    if isinstance(value, list):
        return any(map(_has_surrogate, value))
    if isinstance(value, dict):
        return any(_has_surrogate(key) or _has_surrogate(item) for key, item in value.items())
    return False


def _string(values: dict, name: str) -> str:
    value = values.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(name, "must be a non-empty string")
    return value


def _flag(values: dict, name: str) -> bool:
    value = values.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(name, "must be true or false")
    return value


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, "must be an integer")
    return value


def _optional_int(body: dict, name: str, low: int, high: int) -> int | None:
    """body[name] when set (an integer in [low, high]), else None."""
    value = body.get(name)
    if value is None:
        return None
    if not low <= _int(value, name) <= high:
        raise InvalidRequest(name, f"must lie in [{low}, {high}]")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(name, "must be a number")
    return float(value)


def _error_body(error: Exception) -> tuple[int, dict]:
    """(HTTP status, OpenAI error object) of a refusal; anything else is 500 without details (the log has them)."""
    status, kind = HTTP_ERRORS.get(type(error), (500, "server_error"))
    message = str(error) if isinstance(error, RequestError) else "internal error (see the server log)"
    param = error.field if isinstance(error, InvalidRequest) else None
    code = "model_not_found" if isinstance(error, AdapterNotFound) else None
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _error_response(request: HttpRequest, error: Exception) -> Response:
    status, body = _error_body(error)
    return JSONResponse(body, status)


async def _bad_json(request: HttpRequest, error: Exception) -> Response:
    return await _error_response(request, InvalidRequest("body", f"is not valid JSON ({error})"))


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound before anything slow happens (a taken port fails at once)."""
    address = host.removeprefix("[").removesuffix("]")
    try:
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((address, port), family=family)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} (HTTP): {error.strerror or error}") from None


class RequestIds:
    """ASGI middleware: each HTTP request runs with its request id (the caller's `x-request-id` or a new one)
    in logs.REQUEST_ID and answers with it in the `x-request-id` header."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode())
        ident = request_id(given.decode("latin-1") if given is not None else None)
        REQUEST_ID.set(ident)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER.encode(), ident.encode())]
            await send(message)

        await self._app(scope, receive, send_with_id)


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside loraplex's own event loop: the serving process handles the signals, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]
