"""Adapter names -> versions (content digests), persisted in one JSON file.

Each name has a current version (what "NAME" resolves to) and a history of every version registered
under it and not removed (each resolvable as "NAME@VERSION", VERSION a unique prefix of at least
MIN_VERSION_PREFIX hex digits), so a request that started on an old version can still name it.
Registering a digest makes it the name's current version in one step. Every change is written to the
state file atomically (temp file, fsync, os.replace) before it becomes visible, so after a restart
the registry is exactly what it was; a state file that does not parse stops start-up with a message
instead of being silently reset. All methods are thread-safe.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.durable import write_atomically
from loraplex.adapters.errors import shown
from loraplex.adapters.reference import (
    DIGEST,
    AdapterReference,
    InvalidAdapterReference,
    check_name,
    parse_reference,
)

STATE_FORMAT = 1


class UnknownAdapter(LookupError):
    """No such adapter name, or no such version of it (maps to NOT_FOUND)."""


class VersionIsCurrent(ValueError):
    """Removing the version a name currently resolves to (maps to FAILED_PRECONDITION)."""


class RegistryStateError(RuntimeError):
    """The state file exists but is not a registry state; start-up stops rather than forget adapters."""


@dataclass(frozen=True)
class AdapterEntry:
    """One registered name."""

    name: str
    current: str
    """Digest "NAME" resolves to."""
    versions: tuple[str, ...]
    """Every digest registered under the name and not removed, in order of first registration."""
    pinned: bool = False
    """Keep the current version resident in a device slot (the serving layer enforces it)."""


class AdapterRegistry:
    """Names and their versions, persisted in `state_file` (read at construction if it exists)."""

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file
        state_file.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = _read_state(state_file) if state_file.exists() else {}

    def register(self, name: str, digest: str) -> AdapterEntry:
        """Make `digest` the current version of `name` (adding the name or the version if new)."""
        check_name(name)
        if not DIGEST.fullmatch(digest):
            raise InvalidAdapterReference(f"version {shown(digest)} is not a sha256 digest (64 lowercase hex digits)")
        with self._lock:
            old = self._entries.get(name)
            versions = old.versions if old is not None else ()
            entry = AdapterEntry(name, digest, versions if digest in versions else (*versions, digest),
                                 old is not None and old.pinned)
            if entry != old:
                self._commit({**self._entries, name: entry})
            return entry

    def set_pinned(self, name: str, pinned: bool) -> AdapterEntry:
        """Set whether `name` is pinned (the flag follows the name across versions and restarts)."""
        with self._lock:
            entry = self.entry(check_name(name))
            if entry.pinned != pinned:
                entry = AdapterEntry(name, entry.current, entry.versions, pinned)
                self._commit({**self._entries, name: entry})
            return entry

    def resolve(self, reference: str) -> tuple[str, str]:
        """(name, digest) that "NAME" or "NAME@VERSION" refers to now.

        Raises InvalidAdapterReference (malformed or ambiguous) or UnknownAdapter.
        """
        parsed = parse_reference(reference)
        return parsed.name, self.version(parsed)

    def version(self, reference: AdapterReference) -> str:
        """The digest a parsed reference refers to now.

        Raises InvalidAdapterReference (an ambiguous version prefix) or UnknownAdapter.
        """
        entry = self.entry(reference.name)
        return _match_version(entry, reference.version) if reference.version else entry.current

    def entry(self, name: str) -> AdapterEntry:
        """The registered name `name`; UnknownAdapter if it is not registered."""
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownAdapter(f"no adapter named {name!r} is registered; load it first (loraplex adapters load)")
        return entry

    def entries(self) -> list[AdapterEntry]:
        """Every registered name, sorted by name."""
        entries = self._entries
        return [entries[name] for name in sorted(entries)]

    def remove(self, name: str, version: str = "") -> tuple[str, ...]:
        """Forget version `version` (a digest prefix) of `name`, or the whole name when `version` is "".

        Returns the digests removed (the caller deletes unused files). The current version can only go
        with its name: VersionIsCurrent otherwise. Whether a version is still in use is the caller's check.
        """
        with self._lock:
            entry = self.entry(check_name(name))
            if not version:
                self._commit({key: value for key, value in self._entries.items() if key != name})
                return entry.versions
            digest = _match_version(entry, parse_reference(f"{name}@{version}").version)
            if digest == entry.current:
                raise VersionIsCurrent(f"version {digest[:12]} is the current version of {name!r}; register "
                                       "another version first, or remove the name")
            remaining = tuple(v for v in entry.versions if v != digest)
            self._commit({**self._entries, name: AdapterEntry(name, entry.current, remaining, entry.pinned)})
            return (digest,)

    def _commit(self, entries: dict[str, AdapterEntry]) -> None:
        """Persist `entries`, then make them visible (a failed write changes nothing). Holds the lock."""
        state = {"format": STATE_FORMAT, "adapters": {
            name: {"current": entry.current, "versions": list(entry.versions), "pinned": entry.pinned}
            for name, entry in entries.items()}}
        write_atomically(self.state_file, json.dumps(state, indent=1, sort_keys=True).encode())
        self._entries = entries


def _match_version(entry: AdapterEntry, prefix: str) -> str:
    matches = [digest for digest in entry.versions if digest.startswith(prefix)]
    if not matches:
        known = ", ".join(v[:12] + (" (current)" if v == entry.current else "") for v in entry.versions)
        raise UnknownAdapter(f"adapter {entry.name!r} has no version {prefix!r} (versions: {known})")
    if len(matches) > 1:
        raise InvalidAdapterReference(f"version {prefix!r} of {entry.name!r} matches {len(matches)} versions; "
                                      "give more digits")
    return matches[0]


def _read_state(path: Path) -> dict[str, AdapterEntry]:
    try:
        state = json.loads(path.read_bytes())
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}, expected {STATE_FORMAT}")
        entries = {}
        for name, raw in state["adapters"].items():
            entry = AdapterEntry(check_name(name), raw["current"], tuple(raw["versions"]), raw.get("pinned", False))
            if not isinstance(entry.pinned, bool):
                raise ValueError(f"adapter {name!r}: pinned must be true or false")
            if not all(isinstance(v, str) and DIGEST.fullmatch(v) for v in entry.versions) or \
                    entry.current not in entry.versions or len(set(entry.versions)) != len(entry.versions):
                raise ValueError(f"adapter {name!r}: versions must be distinct sha256 digests including current")
            entries[name] = entry
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise RegistryStateError(f"{path} is not a valid adapter registry state ({error}); restore it from a "
                                 "backup, or move it away to start with an empty registry") from None
    return entries
