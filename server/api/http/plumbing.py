"""The HTTP server plumbing: the listening socket, request ids, and uvicorn inside loraplex's event loop."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.server.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id


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
