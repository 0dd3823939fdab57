"""The HTTP shim's backend when it runs alone: a loraplex server reached over gRPC.

`loraplex http-shim --grpc-target HOST:PORT` serves the OpenAI-style API on this machine and sends
every request to the server at HOST:PORT through the Python client (`AsyncClient`, no retries):
generation through `Generation.GenerateStream`, the model list through `ServerInfo`, vLLM's
load/unload endpoints and the admin listing through `AdapterAdmin`, readiness through the standard
gRPC health service. The caller's `Authorization` header is forwarded as gRPC metadata, so the server
applies its own keys, scopes and allow-lists; its status codes come back as the same core refusals
(server/core/errors.py) the in-process backend raises (so the HTTP answers are the same).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
import uvicorn

from loraplex.client.client import AsyncClient, Chunk, ResourceExhausted, RetryPolicy
from loraplex.client.codec import invalid_argument
from loraplex.server.api.generation_service import FIELD_NAMES
from loraplex.server.api.http.plumbing import EmbeddedServer, bind_http_socket
from loraplex.server.api.http.routes import HttpShim
from loraplex.server.api.interceptor import STATUS_CODES
from loraplex.server.core.calls import (
    GenerateCall,
    GeneratedToken,
    ModelList,
    StopGeneration,
)
from loraplex.server.core.errors import InvalidRequest, Overloaded, RequestError, ShuttingDown
from loraplex.v1 import admin_pb2 as admin_pb

T = TypeVar("T")

REFUSALS = {code: kind for kind, code in STATUS_CODES.items()}
"""The refusal each status code stands for (UNAVAILABLE: the server is draining or unreachable)."""
NEUTRAL_NAMES = {wire: name for name, wire in FIELD_NAMES.items()} | {"text": "prompt", "input": "prompt"}
"""GenerateRequest's field names back to GenerateCall's (an INVALID_ARGUMENT's trailing metadata names one)."""
READY_TIMEOUT_S = 2.0
NO_RETRIES = RetryPolicy(max_attempts=1)
"""A refusal reaches the HTTP caller as it is; retrying is the HTTP caller's decision."""


class RemoteBackend:
    """Backend over one client channel to `target` (TLS with `tls` or `root_certificates`, as AsyncClient)."""

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None) -> None:
        self._client = AsyncClient(target, tls=tls, root_certificates=root_certificates, retry=NO_RETRIES)

    async def generate(self, authorization: str | None, call: GenerateCall) -> AsyncIterator[GeneratedToken]:
        """The server's tokens for `call`; throwing StopGeneration in or closing the iterator cancels the RPC
        (the server frees the sequence)."""
        prompt = call.prompt if isinstance(call.prompt, str) or not call.prompt or isinstance(call.prompt[0], int) \
            else [{"role": m.role, "content": m.content} for m in call.prompt]
        chunks = self._client.forwarding(authorization).generate_stream(
            prompt, call.adapter, chat=call.chat, max_new_tokens=call.max_new_tokens,
            stop_token_ids=call.stop_token_ids, ignore_eos=call.ignore_eos, logprobs=call.logprobs,
            top_logprobs=call.top_logprobs, cache_salt=call.cache_salt, priority=call.priority,
            prompt_logprobs=call.prompt_logprobs, **constraint_options(call), **call.sampling)
        try:
            async for chunk in chunks:
                try:
                    yield generated_token(chunk)
                except StopGeneration:
                    return
        except grpc.aio.AioRpcError as error:
            raise refusal(error) from None
        finally:
            await chunks.aclose()

    async def ready(self) -> bool:
        """Whether the server's health service answers SERVING."""
        return await self._client.serving(timeout=READY_TIMEOUT_S)

    async def models(self, authorization: str | None) -> ModelList:
        """The server's base model and the adapters the key may use (ServerInfo)."""
        info = await _refused(self._client.forwarding(authorization).server_info())
        return ModelList(info.base_model.name, [(adapter.name, adapter.version) for adapter in info.adapters])

    async def load_adapter(self, authorization: str | None, name: str, source: str) -> str:
        loaded = await _refused(self._client.forwarding(authorization).load_adapter(name, source))
        return loaded.adapter.current_version

    async def unload_adapter(self, authorization: str | None, name: str) -> list[str]:
        unloaded = await _refused(self._client.forwarding(authorization).unload_adapter(name))
        return list(unloaded.removed_versions)

    async def adapter_listing(self, authorization: str | None) -> admin_pb.ListAdaptersResponse:
        """The server's ListAdapters answer (scope "admin")."""
        return await _refused(self._client.forwarding(authorization).list_adapters())

    async def close(self) -> None:
        await self._client.close()


async def serve_translator(target: str, host: str, port: int, *, tls: bool = False,
                           root_certificates: bytes | None = None) -> None:
    """Serve the HTTP shim on host:port in front of the server at `target` until SIGTERM or SIGINT."""
    listening = bind_http_socket(host, port)
    backend = RemoteBackend(target, tls=tls, root_certificates=root_certificates)
    server = EmbeddedServer(uvicorn.Config(HttpShim(backend, admin=backend).app, log_level="warning",
                                           lifespan="off"))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    task = asyncio.create_task(server.serve(sockets=[listening]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(f"loraplex http-shim on {host}:{server.port} in front of {target}", flush=True)
    try:
        await task
    finally:
        await backend.close()


def constraint_options(call: GenerateCall) -> dict[str, str | bool]:
    """The client's keyword argument for the call's constraint (none when unset)."""
    if call.constraint is None:
        return {}
    kind = call.constraint.kind
    return {kind: True if kind == "json_object" else call.constraint.value}


def generated_token(chunk: Chunk) -> GeneratedToken:
    """The GeneratedToken a streamed chunk carries (the in-process core's record of the same token)."""
    token = chunk.token
    return GeneratedToken(token.id, token.text, token.logprob, token.piece, token.top_logprobs, chunk.completion,
                          chunk.prompt_tokens, chunk.cached_tokens, chunk.prompt_logprobs)


def refusal(error: grpc.aio.AioRpcError) -> Exception:
    """The core refusal a status stands for; other statuses (INTERNAL, ...) as a RuntimeError (500). An
    INVALID_ARGUMENT names its field in the trailing metadata (codec.invalid_argument)."""
    details = error.details() or ""
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        field, problem = invalid_argument(error.trailing_metadata()) or ("request", details)
        return InvalidRequest(NEUTRAL_NAMES.get(field, field), problem)
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return ShuttingDown(f"the loraplex server is unavailable: {details}")
    if isinstance(error, ResourceExhausted):  # over a limit: the same retry-after for the HTTP caller
        return Overloaded(details, error.retry_after_s)
    kind: type[RequestError] | None = REFUSALS.get(error.code())
    return kind(details) if kind is not None else RuntimeError(f"{error.code().name}: {details}")


async def _refused(answer: Awaitable[T]) -> T:
    """`answer`, with a failed call raised as its refusal."""
    try:
        return await answer
    except grpc.aio.AioRpcError as error:
        raise refusal(error) from None
