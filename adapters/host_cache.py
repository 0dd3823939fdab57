"""The host-memory tier: loaded adapter versions kept in an LRU within a byte budget.

An entry can be held (a request is waiting for it to be copied into a device slot): held entries are
never evicted, so a load is not wasted before it is used; the budget may then be exceeded by the
held entries alone (the caller bounds how many it holds). Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from loraplex.adapters.loading import LoadedAdapter


class HostCache:
    """digest -> LoadedAdapter, least recently used first out, within `budget_bytes` (held ones aside)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.evictions = 0
        """Entries dropped to stay within the budget, since start."""
        self._entries: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._held: set[str] = set()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> LoadedAdapter | None:
        """The entry for `digest` (now the most recently used), or None."""
        with self._lock:
            loaded = self._entries.get(digest)
            if loaded is not None:
                self._entries.move_to_end(digest)
            return loaded

    def put(self, loaded: LoadedAdapter, hold: bool = False) -> None:
        """Insert `loaded` as the most recently used entry, then evict unheld entries beyond the budget
        (an unheld entry larger than the whole budget is not kept)."""
        with self._lock:
            old = self._entries.pop(loaded.digest, None)
            self._bytes -= old.nbytes if old is not None else 0
            self._entries[loaded.digest] = loaded
            self._bytes += loaded.nbytes
            if hold:
                self._held.add(loaded.digest)
            self._shrink()

    def release_hold(self, digest: str) -> None:
        """Make `digest` evictable again (its waiting request got its slot, or went away)."""
        with self._lock:
            self._held.discard(digest)
            self._shrink()

    def _shrink(self) -> None:
        """Evict unheld entries, least recently used first, until within the budget. Holds the lock."""
        for digest in [d for d in self._entries if d not in self._held]:
            if self._bytes <= self.budget_bytes:
                break
            self._bytes -= self._entries.pop(digest).nbytes
            self.evictions += 1

    def discard(self, digest: str) -> None:
        with self._lock:
            loaded = self._entries.pop(digest, None)
            self._held.discard(digest)
            self._bytes -= loaded.nbytes if loaded is not None else 0

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def num_held(self) -> int:
        return len(self._held)
