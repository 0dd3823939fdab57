"""One place that turns refusals into gRPC status codes (and anything unexpected into INTERNAL), and gives
every call its request id (the caller's `x-request-id` metadata or a new one: logs.REQUEST_ID while it
runs, returned in the trailing metadata `x-request-id`, errors included). An INVALID_ARGUMENT also names
its field and problem in the trailing metadata (codec.invalid_argument_metadata), a RESOURCE_EXHAUSTED
from Overloaded (a full queue, a quota) the seconds to wait in `retry-after`. A request message that
does not decode is INVALID_ARGUMENT, logged once per MALFORMED_LOG_INTERVAL_S at most (with the count), no
traceback."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from loraplex.client.codec import RETRY_AFTER_KEY, invalid_argument_metadata
from loraplex.server.core.errors import (
    AdapterNotFound,
    FailedPrecondition,
    GenerationFailed,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RequestError,
    ShuttingDown,
    TooLarge,
    Unauthenticated,
)
from loraplex.server.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id

log = logging.getLogger(__name__)

MALFORMED_LOG_INTERVAL_S = 60.0

STATUS_CODES: dict[type[RequestError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    GenerationFailed: grpc.StatusCode.INTERNAL,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


MALFORMED = object()
"""What the tolerant deserializer hands the handler for a request message that did not decode."""


class MalformedLog:
    """Logs malformed requests at most once per MALFORMED_LOG_INTERVAL_S, with how many came since."""

    def __init__(self) -> None:
        self._logged_at, self._unlogged = -MALFORMED_LOG_INTERVAL_S, 0

    def note(self, method: str) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= MALFORMED_LOG_INTERVAL_S:
            log.warning("%d request message(s) that do not decode refused (INVALID_ARGUMENT), the last one to %s",
                        self._unlogged, method)
            self._logged_at, self._unlogged = now, 0


def _tolerant(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    """`deserializer`, answering MALFORMED instead of raising (grpc would answer UNKNOWN and log a traceback)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception:
            return MALFORMED

    return deserialize


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary-unary and unary-stream handler: RequestError -> its status with the message;
    a request that does not decode -> INVALID_ARGUMENT; any other exception -> INTERNAL (logged with its
    traceback, not shown to the caller)."""

    def __init__(self) -> None:
        self._malformed = MalformedLog()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        codec = dict(request_deserializer=_tolerant(handler.request_deserializer),
                     response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method, self._malformed), **codec)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method, self._malformed), **codec)
        return handler


def _start(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """Set the call's request id; its trailing metadata."""
    ident = request_id(dict(context.invocation_metadata() or ()).get(REQUEST_ID_HEADER))
    REQUEST_ID.set(ident)
    trailing = ((REQUEST_ID_HEADER, ident),)
    context.set_trailing_metadata(trailing)
    return trailing


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str,
                 trailing: tuple[tuple[str, str], ...]) -> None:
    """Abort the call (raises AbortError): a RequestError with its status and message, anything else as INTERNAL."""
    if isinstance(error, InvalidRequest):
        await context.abort(STATUS_CODES[InvalidRequest], str(error),
                            trailing + invalid_argument_metadata(error.field, error.problem))
    elif isinstance(error, Overloaded):
        await context.abort(STATUS_CODES[Overloaded], str(error),
                            (*trailing, (RETRY_AFTER_KEY, str(error.retry_after_s))))
    elif isinstance(error, RequestError):
        await context.abort(STATUS_CODES[type(error)], str(error), trailing)
    else:
        log.error("%s failed", method, exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)", trailing)


async def _refuse_malformed(context: grpc.aio.ServicerContext, method: str, malformed: MalformedLog,
                            trailing: tuple[tuple[str, str], ...]) -> None:
    malformed.note(method)
    await _abort(context, InvalidRequest("request", f"not a valid {method.rsplit('/', 1)[-1]} request message "
                                         "(protobuf)"), method, trailing)


def _guard_unary(behavior, method: str, malformed: MalformedLog):
    async def guarded(request, context: grpc.aio.ServicerContext):
        trailing = _start(context)
        if request is MALFORMED:
            await _refuse_malformed(context, method, malformed, trailing)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error, method, trailing)

    return guarded


def _guard_stream(behavior, method: str, malformed: MalformedLog):
    async def guarded(request, context: grpc.aio.ServicerContext) -> AsyncIterator:
        trailing = _start(context)
        if request is MALFORMED:
            await _refuse_malformed(context, method, malformed, trailing)
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error, method, trailing)

    return guarded
