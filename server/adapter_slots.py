"""Adapters resolved to engine slots: the interface the scheduler uses, and the static start-up map.

The scheduler only sees `AdapterResolver`: `acquire(reference)` returns a lease naming the device
slot and the adapter version a request runs with, `release(lease)` ends that use. A reference is
"NAME" (whatever version is loaded), "NAME@VERSION" (VERSION: the content digest or a prefix of at
least adapters.reference.MIN_VERSION_PREFIX hex digits; any other loaded version is AdapterNotFound)
or "" (the base).
`StaticAdapters` loads a fixed name -> folder map into slots once at start-up; a registry with
hot-swap and cache tiers replaces it behind the same interface (refcounts are what keep an in-use
slot from eviction).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loraplex.adapters.identity import adapter_digest
from loraplex.adapters.peft_format import read_lora_weights
from loraplex.adapters.reference import InvalidAdapterReference, parse_reference
from loraplex.server.engine import Engine
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.errors import AdapterNotFound, InvalidRequest

BASE_MODEL = ""
"""The adapter name that means the base model alone."""


@dataclass(frozen=True)
class AdapterRef:
    """A parsed adapter reference: a name ("" is the base model) and an optional version prefix."""

    name: str
    version: str = ""
    """A prefix of the content digest the request insists on; "" accepts the loaded version."""

    @classmethod
    def parse(cls, reference: str) -> AdapterRef:
        """"NAME", "NAME@VERSION" (adapters.reference's rules) or ""; raises InvalidRequest("adapter", ...)."""
        if reference == BASE_MODEL:
            return cls(BASE_MODEL)
        try:
            return cls(*parse_reference(reference))
        except InvalidAdapterReference as error:
            raise InvalidRequest("adapter", str(error)) from error


@dataclass(frozen=True)
class AdapterLease:
    """One request's use of an adapter version resident in a device slot."""

    name: str
    version: str
    """Content digest of the adapter ("" for the base model)."""
    slot: int
    """Engine slot, or NO_ADAPTER for the base model."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    version: str
    rank: int


class AdapterResolver(Protocol):
    def acquire(self, reference: str) -> AdapterLease:
        """The slot and version `reference` runs with now; raises InvalidRequest (malformed) or
        AdapterNotFound (unknown name, or another version loaded). Pair with `release`."""
        ...

    def release(self, lease: AdapterLease) -> None: ...

    def adapters(self) -> list[AdapterInfo]: ...


class StaticAdapters:
    """A fixed set of adapters, loaded into slots 0..n-1 at start-up and never evicted."""

    def __init__(self, engine: Engine, folders: Mapping[str, Path]) -> None:
        if len(folders) > engine.config.num_slots:
            raise ValueError(f"{len(folders)} adapters do not fit {engine.config.num_slots} slots; raise num_slots")
        self._leases: dict[str, AdapterLease] = {BASE_MODEL: AdapterLease(BASE_MODEL, "", NO_ADAPTER)}
        self._infos: list[AdapterInfo] = []
        self._in_use: dict[str, int] = {}
        for slot, (name, folder) in enumerate(folders.items()):
            engine.set_slot(slot, read_lora_weights(folder, engine.dtype))
            lease = AdapterLease(name, adapter_digest(folder), slot)
            self._leases[name] = lease
            self._infos.append(AdapterInfo(name, lease.version, engine.slot_ranks[slot]))

    def acquire(self, reference: str) -> AdapterLease:
        ref = AdapterRef.parse(reference)
        lease = self._leases.get(ref.name)
        if lease is None:
            known = ", ".join(sorted(n for n in self._leases if n)) or "none"
            raise AdapterNotFound(f"adapter {ref.name!r} is not loaded (loaded: {known})")
        if not lease.version.startswith(ref.version):
            raise AdapterNotFound(f"adapter {ref.name!r} is loaded at version {lease.version[:12]}, "
                                  f"not {ref.version!r}")
        self._in_use[ref.name] = self._in_use.get(ref.name, 0) + 1
        return lease

    def release(self, lease: AdapterLease) -> None:
        self._in_use[lease.name] -= 1

    def in_use(self, name: str) -> int:
        """Requests currently holding `name` (acquired and not yet released)."""
        return self._in_use.get(name, 0)

    def adapters(self) -> list[AdapterInfo]:
        return list(self._infos)
