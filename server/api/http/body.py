"""Reading an HTTP request's JSON body within the size limit, as valid Unicode."""

from __future__ import annotations

import json
import re

from starlette.requests import Request as HttpRequest

from loraplex.adapters.errors import MAX_SHOWN_CHARS
from loraplex.server.core.errors import InvalidRequest, TooLarge

MAX_REQUEST_BYTES = 4 * 2**20
"""Default of the largest HTTP body and gRPC message a server (or the http-shim translator) accepts."""
SURROGATE = re.compile("[\ud800-\udfff]")


async def read_json_body(request: HttpRequest, limit: int) -> dict:
    """The body as a JSON object, read up to the size limit: UTF-8, and no string in it (key or value)
    holds a lone surrogate (an escaped half of a UTF-16 pair, which no tokenizer can encode)."""
    try:
        text = (await _read_body(request, limit)).decode("utf-8")
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


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    """The raw body; TooLarge once its Content-Length or the bytes read so far exceed the limit."""
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


def _has_surrogate(value: object) -> bool:
    """Whether a JSON value holds a string (key or value, at any depth) with a lone surrogate."""
    if isinstance(value, str):
        return SURROGATE.search(value) is not None
    if isinstance(value, list):
        return any(map(_has_surrogate, value))
    if isinstance(value, dict):
        return any(_has_surrogate(key) or _has_surrogate(item) for key, item in value.items())
    return False
