"""The HTTP shim's backend when it runs alone: a loraplex server reached over gRPC.

`loraplex http-shim --grpc-target HOST:PORT` serves the OpenAI-style API on this machine and sends
every request to the server at HOST:PORT: generation through `Generation.GenerateStream`, the model
list through `ServerInfo`, vLLM's load/unload endpoints through `AdapterAdmin`, readiness through the
standard gRPC health service. The caller's `Authorization` header is forwarded as gRPC metadata, so
the server applies its own keys, scopes and allow-lists; its status codes come back as the same
server.errors refusals the in-process backend raises (so the HTTP answers are the same).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.server.errors import InvalidRequest, RequestError, ShuttingDown
from loraplex.server.generation import GenerateCall, GeneratedToken, ModelList, StopGeneration
from loraplex.server.grpc_service import FIELD_NAMES, decode_token, encode_request
from loraplex.server.http_shim import EmbeddedServer, HttpShim, bind_http_socket
from loraplex.server.interceptor import STATUS_CODES
from loraplex.v1 import admin_pb2 as admin_pb
from loraplex.v1 import admin_pb2_grpc as admin_pb_grpc
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

REFUSALS = {code: kind for kind, code in STATUS_CODES.items()}
"""The refusal each status code stands for (UNAVAILABLE: the server is draining or unreachable)."""
NEUTRAL_NAMES = {wire: name for name, wire in FIELD_NAMES.items()} | {"text": "prompt", "input": "prompt"}
"""GenerateRequest's field names back to GenerateCall's (INVALID_ARGUMENT messages start with one)."""
READY_TIMEOUT_S = 2.0


class RemoteBackend:
    """Backend over one gRPC channel to `target` (TLS when `credentials` is given)."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self._channel = (grpc.aio.insecure_channel(target) if credentials is None
                         else grpc.aio.secure_channel(target, credentials))
        self._generation = pb_grpc.GenerationStub(self._channel)
        self._admin = admin_pb_grpc.AdapterAdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def generate(self, authorization: str | None, call: GenerateCall) -> AsyncIterator[GeneratedToken]:
        """The server's tokens for `call`; throwing StopGeneration in or closing the iterator cancels the RPC
        (the server frees the sequence)."""
        stream = self._generation.GenerateStream(encode_request(call), metadata=_metadata(authorization))
        try:
            async for response in stream:
                try:
                    yield decode_token(response.token,
                                       response.completion if response.HasField("completion") else None,
                                       response.prompt_tokens)
                except StopGeneration:
                    return
        except grpc.aio.AioRpcError as error:
            raise refusal(error) from None
        finally:
            stream.cancel()

    async def ready(self) -> bool:
        """Whether the server's health service answers SERVING."""
        try:
            answer = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=READY_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    async def models(self, authorization: str | None) -> ModelList:
        """The server's base model and the adapters the key may use (ServerInfo)."""
        try:
            info = await self._generation.ServerInfo(pb.ServerInfoRequest(), metadata=_metadata(authorization))
        except grpc.aio.AioRpcError as error:
            raise refusal(error) from None
        return ModelList(info.base_model.name, [(adapter.name, adapter.version) for adapter in info.adapters])

    async def load_adapter(self, authorization: str | None, name: str, source: str) -> str:
        try:
            loaded = await self._admin.LoadAdapter(admin_pb.LoadAdapterRequest(name=name, source=source),
                                                   metadata=_metadata(authorization))
        except grpc.aio.AioRpcError as error:
            raise refusal(error) from None
        return loaded.adapter.current_version

    async def unload_adapter(self, authorization: str | None, name: str) -> list[str]:
        try:
            unloaded = await self._admin.UnloadAdapter(admin_pb.UnloadAdapterRequest(name=name),
                                                       metadata=_metadata(authorization))
        except grpc.aio.AioRpcError as error:
            raise refusal(error) from None
        return list(unloaded.removed_versions)

    async def close(self) -> None:
        await self._channel.close()


async def serve_translator(target: str, host: str, port: int, credentials: grpc.ChannelCredentials | None) -> None:
    """Serve the HTTP shim on host:port in front of the server at `target` until SIGTERM or SIGINT."""
    listening = bind_http_socket(host, port)
    backend = RemoteBackend(target, credentials)
    server = EmbeddedServer(uvicorn.Config(HttpShim(backend).app, log_level="warning", lifespan="off"))
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


def refusal(error: grpc.aio.AioRpcError) -> Exception:
    """The server.errors refusal a status stands for; other statuses (INTERNAL, ...) as a RuntimeError (500)."""
    details = error.details() or ""
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, problem = details.partition(": ")
        return InvalidRequest(NEUTRAL_NAMES.get(field, field), problem)
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return ShuttingDown(f"the loraplex server is unavailable: {details}")
    kind: type[RequestError] | None = REFUSALS.get(error.code())
    return kind(details) if kind is not None else RuntimeError(f"{error.code().name}: {details}")


def _metadata(authorization: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", authorization),) if authorization else ()
