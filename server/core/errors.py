"""Why the server refuses a request, independent of the transport.

The scheduler, the request decoding and auth raise these; each transport maps the classes to its
own status codes (gRPC: server/api/interceptor.py). Messages are shown to the caller as they are.
"""

from __future__ import annotations

from collections.abc import Mapping


class RequestError(Exception):
    """A request the server refuses; the message says what to change."""


class InvalidRequest(RequestError):
    """A field is malformed or out of bounds; the message starts with the field's name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem

    def renamed(self, names: Mapping[str, str]) -> InvalidRequest:
        """The same refusal with the field named as a transport calls it (`names`: neutral -> wire name)."""
        return InvalidRequest(names.get(self.field, self.field), self.problem)


class AdapterNotFound(RequestError):
    """The request names an adapter the server does not have."""


class FailedPrecondition(RequestError):
    """The server's state does not allow it now: the adapter is in use, its stored files cannot be
    loaded, too many adapters are pinned; the message says what to do."""


class TooLarge(RequestError):
    """The request is larger than the server accepts (settings.http_max_body_bytes)."""


class Overloaded(RequestError):
    """The request would exceed a limit: the server's waiting queue, or one of its tenant's or adapter's
    quotas (server/core/quotas.py); retry later. Transports send `retry_after_s` (gRPC: trailing metadata
    `retry-after`; HTTP: the Retry-After header)."""

    def __init__(self, message: str, retry_after_s: int = 1, limit: str = "max_waiting") -> None:
        """`limit`: the setting that refused it (max_waiting, max_concurrent, max_queued, tokens_per_minute);
        `retry_after_s`: whole seconds after which a retry may pass (at least 1)."""
        super().__init__(message)
        self.retry_after_s, self.limit = max(1, retry_after_s), limit


class ShuttingDown(RequestError):
    """The server is draining and takes no new requests."""


class GenerationFailed(RequestError):
    """The model produced no usable output for this request (e.g. non-finite logits); the request ends,
    the others go on. Transports answer it as an internal error, with this message."""


class Unauthenticated(RequestError):
    """No API key, or an unknown one."""


class PermissionDenied(RequestError):
    """The API key is valid but may not do this (scope, or an adapter outside its allow-list)."""
