"""Slot placement: which device slot runs a leased version, filled from host memory when needed.

`slot_for` (scheduler thread, when a request is admitted) answers the slot holding the version; else
it copies the version from the host cache into an empty or least recently used idle slot; else it
starts loading it from the store (`Loader`) and answers None: the request keeps waiting while others
run, and the scheduler is woken when the load ends. The busy slots the scheduler passes in keep
eviction away from running sequences; pinned names keep their current version in a slot.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from loraplex.server.core.adapter_runtime.leases import BASE_LEASE, AdapterLease
from loraplex.server.core.adapter_runtime.state import AdapterState
from loraplex.server.core.errors import FailedPrecondition
from loraplex.server.engine.lora import NO_ADAPTER


class Placement(AdapterState):
    """Device slots for leased versions (scheduler thread)."""

    def resident_slot(self, lease: AdapterLease) -> int | None:
        """NO_ADAPTER for the base model, the slot holding the version, or None if no slot holds it."""
        if lease == BASE_LEASE:
            return NO_ADAPTER
        with self._lock:
            return self.slots.find(lease.version)

    def count_device_hit(self) -> None:
        """Count one admission whose version was already in a slot (the scheduler's, when it admits one)."""
        with self._lock:
            self.stats.device_hits += 1

    def can_place(self, busy: Collection[int]) -> bool:
        """Whether some slot outside `busy` (slots running sequences use) is free or may be evicted."""
        with self._lock:
            return self.slots.victim(busy, self._pinned) is not None

    def slot_for(self, lease: AdapterLease, busy: Collection[int]) -> int | None:
        """The slot `lease`'s version runs in, copying it from host memory into a slot outside `busy` if
        needed; None while it is still loading (or no slot outside `busy` can take it). Scheduler thread
        only. Raises FailedPrecondition when the version could not be loaded (its message says why)."""
        if lease == BASE_LEASE:
            return NO_ADAPTER
        digest = lease.version
        with self._lock:
            slot = self.slots.find(digest)
            if slot is not None:
                return slot
            if digest in self._failed:
                raise self._failed[digest]
            loaded = self.host.get(digest)
            slot = self.slots.victim(busy, self._pinned) if loaded is not None else None
            if loaded is None:
                self._start_load(lease.name, digest)
            if slot is None:
                return None
            self.slots.evict(slot)
            if digest not in self._loaded_for_slot:
                self.stats.host_hits += 1
            self._loaded_for_slot.discard(digest)
        began = time.perf_counter()
        self.engine.set_slot(slot, loaded.weights)  # validated on load; the only writer of slot buffers
        if self._on_load_phase is not None:
            self._on_load_phase("copy", time.perf_counter() - began)
        with self._lock:
            self.slots.assign(slot, digest)
            self._warm.pop(digest, None)
            self.host.release_hold(digest)
            self.stats.installs += 1
        return slot

    def install_warm(self, busy: Collection[int]) -> None:
        """Place pinned and prefetched versions that are loaded into idle slots. Scheduler thread only."""
        with self._lock:
            pending = [AdapterLease(name, digest) for digest, name in self._warm.items()]
        for lease in pending:
            if not self.can_place(busy):
                return
            try:
                self.slot_for(lease, busy)
            except FailedPrecondition:
                with self._lock:
                    self._warm.pop(lease.version, None)

    def _refresh_pins(self) -> None:
        """Recompute the pinned digests (current versions of pinned names). Holds `_lock`."""
        self._pinned = {entry.current for entry in self.registry.entries() if entry.pinned}
        for entry in self.registry.entries():
            if entry.pinned and not self.slots.holds(entry.current):
                self._warm_version(entry.name, entry.current)
