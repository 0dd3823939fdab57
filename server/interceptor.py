"""One place that turns refusals into gRPC status codes (and anything unexpected into INTERNAL), and gives
every call its request id (the caller's `x-request-id` metadata or a new one: logs.REQUEST_ID while it
runs, returned in the trailing metadata `x-request-id`, errors included)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from loraplex.server.errors import (
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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary-unary and unary-stream handler: RequestError -> its status with the message;
    any other exception -> INTERNAL (logged with its traceback, not shown to the caller)."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        codec = dict(request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_guard_unary(handler.unary_unary, method), **codec)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_guard_stream(handler.unary_stream, method), **codec)
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
    if isinstance(error, RequestError):
        await context.abort(STATUS_CODES[type(error)], str(error), trailing)
    else:
        log.error("%s failed", method, exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)", trailing)


def _guard_unary(behavior, method: str):
    async def guarded(request, context: grpc.aio.ServicerContext):
        trailing = _start(context)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error, method, trailing)

    return guarded


def _guard_stream(behavior, method: str):
    async def guarded(request, context: grpc.aio.ServicerContext) -> AsyncIterator:
        trailing = _start(context)
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error, method, trailing)

    return guarded
