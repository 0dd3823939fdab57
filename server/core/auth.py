"""API keys: who is calling (UNAUTHENTICATED otherwise) and what that caller may do (PERMISSION_DENIED).

Keys are configured by their sha256 (settings.api_keys); callers send `authorization: Bearer KEY`.
Each RPC requires one scope (see `Scope`). With no keys configured every caller is anonymous
and may do everything (the server then listens on loopback only, unless told otherwise).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from loraplex.server.core.errors import PermissionDenied, Unauthenticated

Scope = Literal["inference", "admin", "metrics"]
"""What an API key may call. Each RPC requires exactly one scope and no scope implies another:
"inference" allows Generate, GenerateStream and ServerInfo; "admin" allows the adapter
administration API (loading, replacing and unloading adapters). An admin key may call the inference
RPCs only when it also has "inference". GET /metrics on the HTTP port takes "metrics" or "admin"."""


class ApiKey(BaseModel):
    """One API key: who holds it, what it may call, which adapters it may use."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = Field(min_length=1, max_length=64)
    """Holder of the key, for logs (the key itself is never logged or stored)."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 (lowercase hex) of the secret key that clients send as `authorization: Bearer KEY`."""
    scopes: frozenset[Scope] = Field(default=frozenset({"inference"}), min_length=1)
    """What the key may call: "inference", "admin", "metrics" (see `Scope`: none implies another)."""
    adapters: frozenset[str] | None = None
    """Adapter names the key may use ("" is the base model); None allows every adapter and the base."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's name, scopes and adapter allow-list (None allows all)."""

    name: str
    scopes: frozenset[Scope]
    adapters: frozenset[str] | None

    def require_scope(self, scope: Scope, *alternatives: Scope) -> None:
        """PermissionDenied unless the key has `scope` or one of `alternatives`."""
        wanted = (scope, *alternatives)
        if self.scopes.isdisjoint(wanted):
            raise PermissionDenied(f"API key {self.name!r} lacks the {' or '.join(map(repr, wanted))} scope")

    def may_use(self, adapter: str) -> bool:
        """Whether the key's allow-list admits `adapter` ("" is the base model)."""
        return self.adapters is None or adapter in self.adapters

    def require_adapter(self, adapter: str) -> None:
        if not self.may_use(adapter):
            shown = repr(adapter) if adapter else "the base model"
            raise PermissionDenied(f"API key {self.name!r} may not use {shown}")


ANONYMOUS = Principal("anonymous", frozenset(get_args(Scope)), None)


class Authenticator:
    """Maps an `authorization` header value to a Principal."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._by_digest = {key.sha256: Principal(key.name, key.scopes, key.adapters) for key in keys}

    def authorize(self, authorization: str | None, scope: Scope, *alternatives: Scope) -> Principal:
        """The caller of this `authorization` value ("Bearer KEY"), if it has `scope` or one of
        `alternatives`; else Unauthenticated or PermissionDenied. Every transport checks callers through here."""
        principal = self.authenticate(authorization)
        principal.require_scope(scope, *alternatives)
        return principal

    def authenticate(self, authorization: str | None) -> Principal:
        """Raises Unauthenticated for a missing, malformed or unknown key (when keys are configured)."""
        if not self._by_digest:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("send an API key as metadata `authorization: Bearer KEY`")
        principal = self._by_digest.get(hashlib.sha256(key.strip().encode()).hexdigest())
        if principal is None:
            raise Unauthenticated("unknown API key")
        return principal
