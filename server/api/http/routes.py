"""The OpenAI-style HTTP API (Starlette app, uvicorn server) over a generation backend.

The backend is the in-process `GenerationCore` when `loraplex serve` runs the shim next to gRPC, or a
`RemoteBackend` (server/api/remote_backend.py) when `loraplex http-shim --grpc-target HOST:PORT` runs it
alone in front of a remote server; the shim itself only translates JSON to `GenerateCall`s and
`GeneratedToken`s to JSON, and forwards `Authorization: Bearer KEY` (or Anthropic's `x-api-key: KEY`) to the
backend, which checks it.

Endpoints: GET /health (the process answers), GET /ready (the backend takes requests; 503 otherwise),
GET /v1/models (the base and every adapter the key may use), POST /v1/completions and
POST /v1/chat/completions, each unary or streamed as server-sent events ending in `data: [DONE]`,
Anthropic's POST /v1/messages (anthropic_request.py; its refusals in Anthropic's error shape),
vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (scope "admin"), GET /v1/admin/adapters
(scope "admin": AdapterAdmin.ListAdapters as protobuf's JSON with the .proto field names), and the
playground page at / (server/api/http/page.py) unless turned off.
Every answer's choice that ends carries `adapter_version` (openai_response.served_by) next to `choices`.
`model` names the base (its folder name, or "") or an adapter ("NAME" or "NAME@VERSION").
Supported: max_tokens / max_completion_tokens, temperature, top_p, seed, stop (a string or a list,
matched on the decoded text), n (choice i samples with seed + i when a seed is given), logprobs and
top_logprobs (chat: a flag and a count; completions: a count), presence_penalty / frequency_penalty,
stream (one event per token and choice when no stop string is set), stream_options.include_usage,
service_tier ("flex" is the batch class: openai_request.SERVICE_TIERS), and vLLM's ignore_eos; unknown
parameters are ignored. A refusal over a limit is 429 with Retry-After. Errors have OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. A client that disconnects frees its sequences.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from loraplex.server.api.http import anthropic_response
from loraplex.server.api.http.anthropic_request import decode_messages
from loraplex.server.api.http.anthropic_streaming import message_events
from loraplex.server.api.http.body import MAX_REQUEST_BYTES, read_json_body
from loraplex.server.api.http.echo import echoed
from loraplex.server.api.http.fields import string_field
from loraplex.server.api.http.openai_request import (
    ADMIN_PARAMS,
    Answer,
    decode_chat,
    decode_completions,
)
from loraplex.server.api.http.openai_response import error_response, render_choice, served_by, usage
from loraplex.server.api.http.page import playground_routes
from loraplex.server.api.http.plumbing import RequestIds
from loraplex.server.api.http.stops import pieces
from loraplex.server.api.http.streaming import events, joined, rest, whole
from loraplex.server.core.calls import GenerateCall, GeneratedToken, ModelList
from loraplex.server.core.errors import InvalidRequest, RequestError
from loraplex.v1 import admin_pb2 as admin_pb

MESSAGES_PATH = "/v1/messages"


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


class AdminListing(Protocol):
    """Where GET /v1/admin/adapters comes from: the gRPC AdminService in process, or a RemoteBackend."""

    async def adapter_listing(self, authorization: str | None) -> admin_pb.ListAdaptersResponse: ...


class HttpShim:
    """The Starlette app over one backend; `app` is the ASGI application."""

    def __init__(self, backend: Backend, metrics: MetricsSource | None = None,
                 max_body_bytes: int = MAX_REQUEST_BYTES, admin: AdminListing | None = None,
                 playground: bool = True) -> None:
        """`metrics`: served at GET /metrics (Prometheus text format, to keys with scope "metrics" or
        "admin") when given; `admin`: GET /v1/admin/adapters when given; `playground`: the page at /.
        A request body over `max_body_bytes` is refused with 413 (TooLarge) as soon as it is known to be."""
        self._backend, self._metrics, self._max_body_bytes = backend, metrics, max_body_bytes
        self._admin = admin
        routes: list[BaseRoute] = [
            Route("/health", self.health), Route("/ready", self.ready), Route("/v1/models", self.models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route(MESSAGES_PATH, self.messages, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"]),
        ]
        if metrics is not None:
            routes.append(Route("/metrics", self.metrics))
        if admin is not None:
            routes.append(Route("/v1/admin/adapters", self.admin_adapters))
        if playground:
            routes.extend(playground_routes())
        self.app = RequestIds(Starlette(routes=routes, exception_handlers={
            RequestError: _refusal, json.JSONDecodeError: _refusal, Exception: _refusal}))

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
        return await self._answer(request, decode_completions(await self._json_body(request)))

    async def chat_completions(self, request: HttpRequest) -> Response:
        return await self._answer(request, decode_chat(await self._json_body(request)))

    async def messages(self, request: HttpRequest) -> Response:
        """Anthropic's Messages API: one reply, as a `message` object or as its event stream."""
        answer = decode_messages(await self._json_body(request))
        choice = pieces(self._backend.generate(_authorization(request), answer.call), answer.stops, answer.params)
        if answer.tool_use.parse:
            choice = whole(choice)
        try:  # refusals surface here, before any byte is sent
            first = await anext(choice)
        except BaseException:
            await choice.aclose()
            raise
        ident = f"msg_{uuid.uuid4().hex}"
        if answer.stream:
            return StreamingResponse(message_events(answer, first, choice, ident), media_type="text/event-stream")
        reply = joined(await rest(first, choice))
        return JSONResponse(anthropic_response.whole_message(answer, ident, reply))

    async def load_lora_adapter(self, request: HttpRequest) -> Response:
        """vLLM's endpoint: {"lora_name", "lora_path"} -> AdapterAdmin.LoadAdapter (scope "admin")."""
        body = await self._json_body(request)
        name, path = string_field(body, "lora_name"), string_field(body, "lora_path")
        try:
            version = await self._backend.load_adapter(_authorization(request), name, path)
        except InvalidRequest as error:
            raise error.renamed(ADMIN_PARAMS) from None
        return JSONResponse({"lora_name": name, "version": version})

    async def unload_lora_adapter(self, request: HttpRequest) -> Response:
        """vLLM's endpoint: {"lora_name"} -> AdapterAdmin.UnloadAdapter without waiting (scope "admin")."""
        name = string_field(await self._json_body(request), "lora_name")
        try:
            removed = await self._backend.unload_adapter(_authorization(request), name)
        except InvalidRequest as error:
            raise error.renamed(ADMIN_PARAMS) from None
        return JSONResponse({"lora_name": name, "removed_versions": removed})

    async def admin_adapters(self, request: HttpRequest) -> Response:
        """AdapterAdmin.ListAdapters (scope "admin"): {"adapters": [{"name", "current_version", "pinned",
        "versions": [{"digest", "rank", "targets", "size_bytes", "dtype", "tier", ...}], "requests_total",
        "active_requests"}]}: protobuf's JSON mapping with the .proto field names, every field present, counts
        as numbers, tiers as "ADAPTER_TIER_DEVICE" / "_HOST" / "_STORE"."""
        listing = await self._admin.adapter_listing(_authorization(request))
        return JSONResponse(json_format.MessageToDict(listing, always_print_fields_with_no_presence=True,
                                                      preserving_proto_field_name=True,
                                                      unquote_int64_if_possible=True))

    async def _json_body(self, request: HttpRequest) -> dict:
        return await read_json_body(request, self._max_body_bytes)

    async def _answer(self, request: HttpRequest, answer: Answer) -> Response:
        """Start every choice, then answer in one JSON document or as an event stream."""
        chat = answer.chat
        authorization = _authorization(request)
        choices = [pieces(self._backend.generate(authorization, call), answer.stops, answer.params)
                   for call in answer.calls]
        if answer.stream and answer.tool_use.parse:
            choices = [whole(choice) for choice in choices]
        if answer.echo:
            choices = [echoed(choice, call.prompt if isinstance(call.prompt, str) else None, answer.prompt_only)
                       for choice, call in zip(choices, answer.calls, strict=True)]
        try:  # refusals (unknown model, overload, bad parameter) surface here, before any byte is sent
            firsts = await asyncio.gather(*(anext(choice) for choice in choices))
        except BaseException:
            await asyncio.gather(*(choice.aclose() for choice in choices), return_exceptions=True)
            raise
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if answer.stream:
            return StreamingResponse(events(answer, firsts, choices, ident, created), media_type="text/event-stream")
        collected = await asyncio.gather(*(rest(first, choice) for first, choice in zip(firsts, choices, strict=True)))
        rendered = [render_choice(answer, index, joined(choice_pieces), final=True)
                    for index, choice_pieces in enumerate(collected)]
        return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": answer.model, "choices": rendered,
                             "usage": usage([choice_pieces[-1] for choice_pieces in collected]),
                             **served_by(collected[0][-1])})


def _authorization(request: HttpRequest) -> str | None:
    """The caller's credentials as the backend takes them: the Authorization header, else `x-api-key: KEY`
    (Anthropic's header) as "Bearer KEY"."""
    key = request.headers.get("x-api-key")
    return request.headers.get("authorization") or (f"Bearer {key}" if key else None)


async def _refusal(request: HttpRequest, error: Exception) -> Response:
    """A refusal in the shape of the protocol its route speaks: Anthropic's on /v1/messages, else OpenAI's; a
    body that is not JSON is an InvalidRequest of field "body"."""
    if isinstance(error, json.JSONDecodeError):
        error = InvalidRequest("body", f"is not valid JSON ({error})")
    if request.url.path == MESSAGES_PATH:
        return await anthropic_response.error_response(request, error)
    return await error_response(request, error)
