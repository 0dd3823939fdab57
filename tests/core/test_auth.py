"""`core.auth`: who is calling (Unauthenticated otherwise) and what that caller may do (PermissionDenied)."""

from __future__ import annotations

import hashlib

import pytest

from loraplex.server.core.auth import ANONYMOUS, ApiKey, Authenticator
from loraplex.server.core.errors import PermissionDenied, Unauthenticated


def key(name: str, secret: str, scopes=("inference",), adapters=None) -> ApiKey:
    return ApiKey(name=name, sha256=hashlib.sha256(secret.encode()).hexdigest(), scopes=frozenset(scopes),
                  adapters=None if adapters is None else frozenset(adapters))


AUTH = Authenticator([key("reader", "r-secret", adapters=["support", ""]), key("ops", "o-secret", ("admin",)),
                      key("scraper", "m-secret", ("metrics",))])


def test_without_keys_every_caller_is_anonymous_with_every_scope() -> None:
    open_auth = Authenticator([])
    for scope in ("inference", "admin", "metrics"):
        assert open_auth.authorize(None, scope) is ANONYMOUS
    assert ANONYMOUS.may_use("anything") and ANONYMOUS.may_use("")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic r-secret", "r-secret"])
def test_a_missing_or_malformed_header_is_unauthenticated(header) -> None:
    with pytest.raises(Unauthenticated, match="authorization: Bearer KEY"):
        AUTH.authorize(header, "inference")


def test_an_unknown_key_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated, match="unknown API key"):
        AUTH.authorize("Bearer not-a-key", "inference")


def test_the_scheme_is_case_insensitive_and_the_key_is_stripped() -> None:
    assert AUTH.authorize("bearer  r-secret ", "inference").name == "reader"


def test_a_key_without_the_scope_is_denied_and_no_scope_implies_another() -> None:
    with pytest.raises(PermissionDenied, match="'reader' lacks the 'admin' scope"):
        AUTH.authorize("Bearer r-secret", "admin")
    with pytest.raises(PermissionDenied, match="lacks the 'inference' scope"):
        AUTH.authorize("Bearer o-secret", "inference")  # admin does not imply inference


def test_alternative_scopes_admit_either() -> None:
    assert AUTH.authorize("Bearer m-secret", "metrics", "admin").name == "scraper"
    assert AUTH.authorize("Bearer o-secret", "metrics", "admin").name == "ops"
    with pytest.raises(PermissionDenied, match="'metrics' or 'admin'"):
        AUTH.authorize("Bearer r-secret", "metrics", "admin")


def test_the_allow_list_admits_only_its_adapters_and_names_the_base() -> None:
    reader = AUTH.authorize("Bearer r-secret", "inference")
    assert reader.may_use("support") and reader.may_use("")
    reader.require_adapter("support")
    with pytest.raises(PermissionDenied, match="may not use 'billing'"):
        reader.require_adapter("billing")
    no_base = Authenticator([key("k", "s", adapters=["support"])]).authorize("Bearer s", "inference")
    with pytest.raises(PermissionDenied, match="may not use the base model"):
        no_base.require_adapter("")
