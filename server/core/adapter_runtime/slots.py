"""The device tier: which adapter version each engine slot holds, and which slot to reuse next.

Only the scheduler thread writes slots (between engine steps); the owner (`AdapterManager`) guards
this table with its lock so that listings from other threads see a consistent picture. A slot is
reused least recently used first, never when it is busy (a running sequence uses it) or pinned.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterator


class DeviceSlots:
    """`num_slots` slots, each empty or holding one adapter version (its digest)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.evictions = 0
        """Versions replaced in a slot to make room for another, since start."""
        self._digests: list[str | None] = [None] * num_slots
        self._by_digest: dict[str, int] = {}
        self._last_used = [0] * num_slots
        self._clock: Iterator[int] = itertools.count(1)

    def find(self, digest: str) -> int | None:
        """The slot holding `digest`, marked as just used; None if no slot holds it."""
        slot = self._by_digest.get(digest)
        if slot is not None:
            self._last_used[slot] = next(self._clock)
        return slot

    def holds(self, digest: str) -> bool:
        return digest in self._by_digest

    def victim(self, busy: Collection[int], pinned: Collection[str]) -> int | None:
        """The slot to load a new version into: an empty one, else the least recently used one that is
        neither in `busy` nor holding a digest in `pinned`; None if every slot is busy or pinned."""
        candidates = [slot for slot, digest in enumerate(self._digests)
                      if slot not in busy and digest not in pinned]
        return min(candidates, key=lambda slot: (self._digests[slot] is not None, self._last_used[slot]), default=None)

    def assign(self, slot: int, digest: str) -> None:
        """Record that the empty `slot` now holds `digest` (the caller copied the weights in)."""
        assert self._digests[slot] is None, f"slot {slot} is not empty"
        self._digests[slot] = digest
        self._by_digest[digest] = slot
        self._last_used[slot] = next(self._clock)

    def evict(self, slot: int) -> None:
        """Empty `slot` to make room for another version (counted in `evictions` if it held one)."""
        if self._digests[slot] is not None:
            self.evictions += 1
            self.clear(slot)

    def clear(self, slot: int) -> None:
        """Forget what `slot` holds (the weights stay until overwritten; no request can name them)."""
        old = self._digests[slot]
        if old is not None:
            del self._by_digest[old]
            self._digests[slot] = None

    def forget(self, digest: str) -> None:
        """Forget the slot holding `digest`, if any."""
        slot = self._by_digest.get(digest)
        if slot is not None:
            self.clear(slot)
