"""`api.interceptor`: refusals to status codes, INVALID_ARGUMENT's field in the trailing metadata, request
ids, undecodable messages, and unexpected errors hidden as INTERNAL, on a real gRPC server on loopback."""

from __future__ import annotations

import grpc
import pytest

from loraplex.client.codec import invalid_argument
from loraplex.server.api.interceptor import STATUS_CODES, ErrorInterceptor
from loraplex.server.core import errors
from loraplex.server.logs import REQUEST_ID, REQUEST_ID_HEADER
from loraplex.v1 import generation_pb2 as pb

SERVICE = "loraplex.test.Probe"
REFUSALS = {
    "invalid": errors.InvalidRequest("stopping.max_new_tokens", "9 is outside [1, 8] (\u00e9 too)"),
    "missing": errors.AdapterNotFound("no adapter named 'x' is registered"),
    "busy": errors.Overloaded("256 requests are waiting"),
    "draining": errors.ShuttingDown("the server is shutting down"),
    "denied": errors.PermissionDenied("API key 'k' lacks the 'admin' scope"),
}


async def unary(request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
    if request.adapter == "crash":
        raise RuntimeError("a secret detail")
    if request.adapter in REFUSALS:
        raise REFUSALS[request.adapter]
    return pb.GenerateResponse(text=REQUEST_ID.get())


async def stream(request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
    yield pb.GenerateStreamResponse(prompt_tokens=1)
    raise REFUSALS.get(request.adapter, RuntimeError("a secret detail"))


@pytest.fixture
async def channel():
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, pb.GenerateRequest.FromString,
                                                     pb.GenerateResponse.SerializeToString),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, pb.GenerateRequest.FromString,
                                                       pb.GenerateStreamResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as open_channel:
        yield open_channel
    await server.stop(None)


def call_unary(channel: grpc.aio.Channel, raw: bool = False):
    return channel.unary_unary(f"/{SERVICE}/Unary",
                               request_serializer=(lambda data: data) if raw else pb.GenerateRequest.SerializeToString,
                               response_deserializer=pb.GenerateResponse.FromString)


@pytest.mark.parametrize("adapter", sorted(REFUSALS))
async def test_each_refusal_has_its_status_and_message(channel, adapter) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_unary(channel)(pb.GenerateRequest(adapter=adapter))
    refusal = REFUSALS[adapter]
    assert caught.value.code() == STATUS_CODES[type(refusal)]
    assert caught.value.details() == str(refusal)


async def test_invalid_argument_names_its_field_in_the_trailing_metadata(channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_unary(channel)(pb.GenerateRequest(adapter="invalid"))
    assert invalid_argument(caught.value.trailing_metadata()) == ("stopping.max_new_tokens",
                                                                  "9 is outside [1, 8] (\u00e9 too)")


async def test_other_refusals_name_no_field(channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_unary(channel)(pb.GenerateRequest(adapter="missing"))
    assert invalid_argument(caught.value.trailing_metadata()) is None


async def test_an_unexpected_error_is_internal_without_its_details(channel, caplog) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_unary(channel)(pb.GenerateRequest(adapter="crash"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details()
    assert "a secret detail" in caplog.text  # logged with its traceback


async def test_a_message_that_does_not_decode_is_invalid_argument_naming_the_request(channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_unary(channel, raw=True)(b"\xff\xff\xff")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    field, problem = invalid_argument(caught.value.trailing_metadata())
    assert field == "request" and "not a valid Unary request message" in problem


async def test_the_callers_request_id_is_used_and_returned(channel) -> None:
    call = call_unary(channel)(pb.GenerateRequest(), metadata=((REQUEST_ID_HEADER, "abc-123"),))
    response = await call
    trailing = dict(await call.trailing_metadata())
    assert response.text == "abc-123" and trailing[REQUEST_ID_HEADER] == "abc-123"


async def test_a_new_request_id_is_returned_also_with_an_error(channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_unary(channel)(pb.GenerateRequest(adapter="busy"))
    assert dict(caught.value.trailing_metadata())[REQUEST_ID_HEADER]


async def test_a_stream_that_fails_after_a_response_ends_with_the_refusals_status(channel) -> None:
    call = channel.unary_stream(f"/{SERVICE}/Stream", request_serializer=pb.GenerateRequest.SerializeToString,
                                response_deserializer=pb.GenerateStreamResponse.FromString)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in call(pb.GenerateRequest(adapter="draining")):
            received.append(response)
    assert len(received) == 1 and caught.value.code() == grpc.StatusCode.UNAVAILABLE
