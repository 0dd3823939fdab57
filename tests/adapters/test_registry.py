"""`adapters.registry.AdapterRegistry`: versions and aliases, restart recovery, atomic state writes,
corrupt state refused, concurrent registrations, and the messages of bad or unknown references."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from loraplex.adapters import durable
from loraplex.adapters.reference import InvalidAdapterReference
from loraplex.adapters.registry import (
    AdapterEntry,
    AdapterRegistry,
    RegistryStateError,
    UnknownAdapter,
    VersionIsCurrent,
)


def digest(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


V1, V2, V3 = digest("v1"), digest("v2"), digest("v3")


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "state" / "registry.json")


def test_register_moves_the_name_and_keeps_history(registry: AdapterRegistry) -> None:
    assert registry.register("support", V1) == AdapterEntry("support", V1, (V1,))
    assert registry.register("support", V2) == AdapterEntry("support", V2, (V1, V2))
    assert registry.resolve("support") == ("support", V2)
    assert registry.resolve(f"support@{V1[:8]}") == ("support", V1)
    assert registry.resolve(f"support@{V2}") == ("support", V2)
    assert registry.register("support", V1) == AdapterEntry("support", V1, (V1, V2))  # back to an old version
    assert registry.resolve("support") == ("support", V1)


def test_remove_a_version_or_a_name(registry: AdapterRegistry) -> None:
    registry.register("support", V1)
    registry.register("support", V2)
    registry.register("other", V3)
    with pytest.raises(VersionIsCurrent, match=rf"version {V2[:12]} is the current version of 'support'; register "
                       r"another version first, or remove the name"):
        registry.remove("support", V2[:8])
    assert registry.remove("support", V1[:10]) == (V1,)
    with pytest.raises(UnknownAdapter, match=rf"adapter 'support' has no version '{V1[:8]}' \(versions: "
                       rf"{V2[:12]} \(current\)\)"):
        registry.resolve(f"support@{V1[:8]}")
    assert registry.remove("support") == (V2,)
    assert [entry.name for entry in registry.entries()] == ["other"]


def test_restart_recovers_an_identical_registry(registry: AdapterRegistry) -> None:
    for index in range(5):
        registry.register(f"adapter-{index % 3}", digest(str(index)))
    registry.remove("adapter-0", digest("0")[:8])
    registry.remove("adapter-2")
    reopened = AdapterRegistry(registry.state_file)
    assert reopened.entries() == registry.entries()
    assert reopened.resolve(f"adapter-1@{digest('1')[:8]}") == registry.resolve(f"adapter-1@{digest('1')[:8]}")
    assert os.listdir(registry.state_file.parent) == ["registry.json"]  # no temp files left


def test_a_failed_write_changes_nothing(registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.register("support", V1)
    saved = registry.state_file.read_bytes()

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        registry.register("support", V2)
    assert registry.resolve("support") == ("support", V1)
    assert registry.state_file.read_bytes() == saved
    assert os.listdir(registry.state_file.parent) == ["registry.json"]


@pytest.mark.parametrize(("text", "problem"), [
    ('{"format": 1, "adapters": {', r"Expecting"),
    ("", r"Expecting value"),
    ('{"format": 2, "adapters": {}}', r"format 2, expected 1"),
    (json.dumps({"format": 1, "adapters": {"a": {"current": V2, "versions": [V1]}}}),
     r"adapter 'a': versions must be distinct sha256 digests including current"),
    (json.dumps({"format": 1, "adapters": {"../x": {"current": V1, "versions": [V1]}}}), r"is not allowed"),
    ('[1, 2]', r"'list' object has no attribute 'get'"),
])
def test_corrupt_state_is_reported_not_reset(tmp_path: Path, text: str, problem: str) -> None:
    state = tmp_path / "registry.json"
    state.write_text(text)
    with pytest.raises(RegistryStateError, match=rf"registry.json is not a valid adapter registry state \(.*{problem}"
                       r".*\); restore it from a backup, or move it away to start with an empty registry"):
        AdapterRegistry(state)
    assert state.read_text() == text


def test_concurrent_registrations(registry: AdapterRegistry) -> None:
    def register(worker: int) -> None:
        for step in range(20):
            registry.register(f"own-{worker}", digest(f"{worker}-{step}"))
            registry.register("shared", digest(f"shared-{worker}-{step}"))

    threads = [threading.Thread(target=register, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shared = registry.entry("shared")
    assert sorted(shared.versions) == sorted(digest(f"shared-{w}-{s}") for w in range(8) for s in range(20))
    for worker in range(8):
        assert registry.entry(f"own-{worker}").versions == tuple(digest(f"{worker}-{s}") for s in range(20))
    assert AdapterRegistry(registry.state_file).entries() == registry.entries()


@pytest.mark.parametrize(("reference", "message"), [
    ("../etc", r"adapter name '\.\./etc' is not allowed: use letters, digits"),
    ("", r"adapter name '' is not allowed"),
    ("support@abc", r"version 'abc' in 'support@abc' is not 8 to 64 lowercase hex digits of the adapter's sha256"),
    ("support@ABCDEF0123", r"version 'ABCDEF0123' .* is not 8 to 64 lowercase hex digits"),
])
def test_bad_references(registry: AdapterRegistry, reference: str, message: str) -> None:
    registry.register("support", V1)
    with pytest.raises(InvalidAdapterReference, match=message):
        registry.resolve(reference)


def test_bad_registrations(registry: AdapterRegistry) -> None:
    with pytest.raises(InvalidAdapterReference, match=r"adapter name 'a b' is not allowed"):
        registry.register("a b", V1)
    with pytest.raises(InvalidAdapterReference, match=r"version 'v1' is not a sha256 digest"):
        registry.register("support", "v1")
    assert not registry.state_file.exists()


def test_unknown_names_and_versions(registry: AdapterRegistry) -> None:
    registry.register("support", V1)
    with pytest.raises(UnknownAdapter, match=r"no adapter named 'missing' is registered; load it first"):
        registry.resolve("missing")
    with pytest.raises(UnknownAdapter, match=rf"adapter 'support' has no version '{V2[:8]}' \(versions: "
                       rf"{V1[:12]} \(current\)\)"):
        registry.resolve(f"support@{V2[:8]}")
    with pytest.raises(UnknownAdapter, match=r"no adapter named 'missing'"):
        registry.remove("missing")


def test_ambiguous_prefix(registry: AdapterRegistry) -> None:
    first, second = "0123456789" + "a" * 54, "0123456789" + "b" * 54
    registry.register("support", first)
    registry.register("support", second)
    with pytest.raises(InvalidAdapterReference, match=r"version '012345678' of 'support' matches 2 versions; "
                       r"give more digits"):
        registry.resolve("support@012345678")
    assert registry.resolve("support@0123456789a") == ("support", first)
