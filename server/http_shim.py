"""The OpenAI-style HTTP API, served next to gRPC on the same scheduler (Starlette app, uvicorn server).

Endpoints: GET /health (the process answers), GET /ready (the model is loaded and requests are taken),
GET /v1/models (the base and every adapter the key may use), POST /v1/completions and
POST /v1/chat/completions, each unary or streamed as server-sent events ending in `data: [DONE]`,
and vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (scope "admin").
`model` names the base (its folder name, or "") or an adapter ("NAME" or "NAME@VERSION").
Supported: max_tokens / max_completion_tokens, temperature, top_p, seed, stop (a string or a list,
matched on the decoded text), stream (one event per token when no stop string is set),
stream_options.include_usage, and vLLM's ignore_eos; parameters loraplex does not
implement yet (n > 1, logprobs, top_logprobs, presence/frequency penalties) are refused with 400
rather than silently ignored; unknown parameters are ignored. Errors have OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. A client that disconnects frees its sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from transformers import PreTrainedTokenizerBase

from loraplex.server import errors
from loraplex.server.adapter_manager import check_reference, request_errors
from loraplex.server.auth import Authenticator, Principal
from loraplex.server.detokenizer import IncrementalDetokenizer
from loraplex.server.engine import FinishReason, SamplingParams
from loraplex.server.errors import AdapterNotFound, InvalidRequest, RequestError
from loraplex.server.scheduler import Request, RequestLimits, Scheduler
from loraplex.server.settings import Scope

#: HTTP status and OpenAI error type of each refusal.
HTTP_ERRORS: dict[type[RequestError], tuple[int, str]] = {
    errors.InvalidRequest: (400, "invalid_request_error"),
    errors.FailedPrecondition: (400, "invalid_request_error"),
    errors.Unauthenticated: (401, "authentication_error"),
    errors.PermissionDenied: (403, "permission_error"),
    errors.AdapterNotFound: (404, "not_found_error"),
    errors.Overloaded: (429, "rate_limit_error"),
    errors.ShuttingDown: (503, "service_unavailable"),
}
FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
MAX_STOP_STRINGS = 4
UNSUPPORTED = {"n": 1, "logprobs": None, "top_logprobs": None, "presence_penalty": 0, "frequency_penalty": 0}
"""Parameters not implemented yet, with the only value accepted (OpenAI's default)."""


@dataclass(frozen=True)
class Generated:
    """One step of an answer: the text it adds, and on the last one the finish reason and token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class HttpShim:
    """The Starlette app over one scheduler; `app` is the ASGI application."""

    def __init__(self, scheduler: Scheduler, tokenizer: PreTrainedTokenizerBase | None, auth: Authenticator,
                 limits: RequestLimits, model_name: str) -> None:
        self._scheduler, self._tokenizer, self._auth = scheduler, tokenizer, auth
        self._limits, self._model_name = limits, model_name
        self.app = Starlette(routes=[
            Route("/health", self.health), Route("/ready", self.ready), Route("/v1/models", self.models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"]),
        ], exception_handlers={RequestError: _error_response, json.JSONDecodeError: _bad_json})

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ready", "model": self._model_name})

    async def models(self, request: HttpRequest) -> Response:
        principal = self._principal(request)
        statuses = self._scheduler.adapters.statuses()
        base = [{"id": self._model_name, "object": "model", "created": 0, "owned_by": "loraplex"}]
        adapters = [{"id": status.name, "object": "model", "created": 0, "owned_by": "loraplex",
                     "parent": self._model_name, "version": status.current}
                    for status in statuses if principal.may_use(status.name)]
        return JSONResponse({"object": "list", "data": (base if principal.may_use("") else []) + adapters})

    async def completions(self, request: HttpRequest) -> Response:
        body = await _json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            prompt_ids = self._require_tokenizer("prompt")(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt_ids = prompt
        else:
            raise InvalidRequest("prompt", "must be a non-empty string, or a list of token ids")
        return await self._answer(request, body, prompt_ids, chat=False)

    async def chat_completions(self, request: HttpRequest) -> Response:
        body = await _json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise InvalidRequest("messages", "must be a non-empty list of {role, content} with string content")
        tokenizer = self._require_tokenizer("messages")
        if not tokenizer.chat_template:
            raise InvalidRequest("messages", "this model has no chat template; use /v1/completions")
        prompt_ids = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
        return await self._answer(request, body, list(prompt_ids), chat=True)

    async def load_lora_adapter(self, request: HttpRequest) -> Response:
        """vLLM's endpoint: {"lora_name", "lora_path"} -> AdapterAdmin.LoadAdapter (scope "admin")."""
        self._principal(request, "admin")
        body = await _json_body(request)
        name, path = _string(body, "lora_name"), _string(body, "lora_path")
        adapters = self._scheduler.adapters
        with request_errors():
            _, summary, _ = await asyncio.get_running_loop().run_in_executor(adapters.admin_executor, adapters.load,
                                                                             path, name)
        return JSONResponse({"lora_name": name, "version": summary.digest})

    async def unload_lora_adapter(self, request: HttpRequest) -> Response:
        """vLLM's endpoint: {"lora_name"} -> AdapterAdmin.UnloadAdapter without waiting (scope "admin")."""
        self._principal(request, "admin")
        name = _string(await _json_body(request), "lora_name")
        adapters = self._scheduler.adapters
        with request_errors():
            removed, _ = await asyncio.get_running_loop().run_in_executor(adapters.admin_executor, adapters.unload,
                                                                          name)
        return JSONResponse({"lora_name": name, "removed_versions": list(removed)})

    async def _answer(self, request: HttpRequest, body: dict, prompt_ids: list[int], chat: bool) -> Response:
        """Submit, then answer in one JSON document or as an event stream."""
        principal = self._principal(request)
        model = body.get("model", "")
        if not isinstance(model, str):
            raise InvalidRequest("model", "must be a string")
        adapter = "" if model in ("", self._model_name) else model
        principal.require_adapter(check_reference(adapter))
        sampling, stops = self._sampling(body)
        stream = _flag(body, "stream")
        include_usage = _flag(body.get("stream_options") or {}, "include_usage")
        pieces = self._generate(Request(adapter, prompt_ids, sampling), prompt_ids, stops)
        first = await anext(pieces)  # refusals (unknown model, overload) surface here, before any byte is sent
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if stream:
            events = _events(first, pieces, ident, created, model, chat, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        text, last = first.text, first
        try:
            async for piece in pieces:
                text, last = text + piece.text, piece
        finally:  # also when the client goes away mid-answer
            await pieces.aclose()
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason}
                  if chat else {"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": None})
        return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": model, "choices": [choice], "usage": _usage(last)})

    async def _generate(self, request: Request, prompt_ids: list[int], stops: tuple[str, ...],
                        ) -> AsyncIterator[Generated]:
        """Text pieces of one request: a first empty piece once it is accepted, then the text as it comes,
        cut at the first stop string (held back while it may still be forming); the last piece finishes."""
        stream = self._scheduler.submit(request)
        yield Generated("")
        detokenizer = IncrementalDetokenizer(self._tokenizer, prompt_ids) if self._tokenizer else None
        held, generated, holdback = "", 0, max(map(len, stops), default=1) - 1
        try:
            async for event in stream:
                generated += 1
                final = event.finish_reason is not None
                held += detokenizer.add(event.token_id, final) if detokenizer else ""
                cut = min((i for i in (held.find(stop) for stop in stops) if i >= 0), default=-1)
                if cut >= 0 or final:
                    reason = "stop" if cut >= 0 else FINISH[event.finish_reason]
                    yield Generated(held[:cut] if cut >= 0 else held, reason, len(prompt_ids), generated)
                    return
                if not stops:  # one piece per token, as gRPC streams (its text may be empty)
                    emit, held = held, ""
                    yield Generated(emit)
                elif len(held) > holdback:
                    emit, held = held[:len(held) - holdback], held[len(held) - holdback:]
                    yield Generated(emit)
        finally:  # done, stopped by a stop string, or the client went away: free the sequence
            stream.cancel()

    def _sampling(self, body: dict) -> tuple[SamplingParams, tuple[str, ...]]:
        for name, accepted in UNSUPPORTED.items():
            if body.get(name, accepted) not in (accepted, None):
                raise InvalidRequest(name, f"only {accepted!r} is supported by this server")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_new_tokens = self._limits.default_max_new_tokens if max_tokens is None else _int(max_tokens, "max_tokens")
        self._limits.check_max_new_tokens(max_new_tokens, "max_tokens")
        values = {"temperature": _number(body, "temperature", 1.0), "top_p": _number(body, "top_p", 1.0)}
        if body.get("seed") is not None:
            values["seed"] = _int(body["seed"], "seed")
        stop = body.get("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequest("stop", f"must be a non-empty string or a list of up to {MAX_STOP_STRINGS}")
        try:
            return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=_flag(body, "ignore_eos"), **values), stops
        except ValueError as error:
            raise InvalidRequest(str(error).split("=")[0].rsplit(" ", 1)[-1], str(error)) from None

    def _principal(self, request: HttpRequest, scope: Scope = "inference") -> Principal:
        principal = self._auth.authenticate(request.headers.get("authorization"))
        principal.require_scope(scope)
        return principal

    def _require_tokenizer(self, field: str) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise InvalidRequest(field, "this model folder has no tokenizer; send token ids to /v1/completions")
        return self._tokenizer


async def _events(first: Generated, pieces: AsyncIterator[Generated], ident: str, created: int, model: str,
                  chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """The SSE frames of one streamed answer (the role first for chat), then the usage chunk if asked, then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    last = first

    def frame(payload: dict) -> str:
        return f"data: {json.dumps({'id': ident, 'object': kind, 'created': created, 'model': model, **payload})}\n\n"

    def choice(text: str, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return {"choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    try:
        if chat:
            yield frame(choice("", None, role=True))
        async for piece in pieces:
            last = piece
            yield frame(choice(piece.text, piece.finish_reason))
    finally:  # a client that disconnects mid-stream frees its sequence
        await pieces.aclose()
    if include_usage:
        yield frame({"choices": [], "usage": _usage(last)})
    yield "data: [DONE]\n\n"


def _usage(last: Generated) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


async def _json_body(request: HttpRequest) -> dict:
    body = json.loads(await request.body())
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    return body


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


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(name, "must be a number")
    return float(value)


async def _error_response(request: HttpRequest, error: Exception) -> Response:
    status, kind = HTTP_ERRORS.get(type(error), (500, "server_error"))
    param = error.field if isinstance(error, InvalidRequest) else None
    code = "model_not_found" if isinstance(error, AdapterNotFound) else None
    return JSONResponse({"error": {"message": str(error), "type": kind, "param": param, "code": code}}, status)


async def _bad_json(request: HttpRequest, error: Exception) -> Response:
    return await _error_response(request, InvalidRequest("body", f"is not valid JSON ({error})"))


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside loraplex's own event loop: the serving process handles the signals, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]
