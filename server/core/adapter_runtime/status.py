"""Read-outs: each name's versions, tiers and use counts, residency per tier, and the tier counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from loraplex.adapters.errors import AdapterFormatError
from loraplex.adapters.registry import AdapterEntry
from loraplex.adapters.store import VersionNotStored
from loraplex.adapters.validation import AdapterSummary
from loraplex.server.core.adapter_runtime.state import AdapterState

Tier = Literal["device", "host", "store"]


@dataclass(frozen=True)
class VersionStatus:
    digest: str
    summary: AdapterSummary | None
    """None when the stored files no longer pass validation (`problem` says why)."""
    tier: Tier
    """Nearest tier holding it: a device slot, host memory, or only the store."""
    active_requests: int
    """Requests holding this version now (waiting or running)."""
    problem: str = ""


@dataclass(frozen=True)
class AdapterStatus:
    name: str
    current: str
    pinned: bool
    versions: tuple[VersionStatus, ...]
    """Every registered version, in order of registration."""
    requests_total: int
    """Requests accepted for this name since the server started."""

    def current_rank(self) -> int:
        """Rank of the current version (0 if its stored files no longer validate)."""
        current = next(version for version in self.versions if version.digest == self.current)
        return current.summary.rank if current.summary is not None else 0


class StatusReadouts(AdapterState):
    """What the admin API, ServerInfo and the metrics read (any thread)."""

    def residency(self) -> dict[str, dict[str, int]]:
        """name -> {tier: versions of it held there}: "store" counts its registered versions, "host" those
        in host memory, "device" those in a slot."""
        with self._lock:
            return {entry.name: {"store": len(entry.versions),
                                 "host": sum(digest in self.host for digest in entry.versions),
                                 "device": sum(self.slots.holds(digest) for digest in entry.versions)}
                    for entry in self.registry.entries()}

    def tier_counters(self) -> dict[str, int]:
        """{device,host}_{cache_hits,cache_misses,evictions} since start (a host miss is a store read, done
        or failed), and load_failures (store reads that failed)."""
        stats = self.stats
        return {"device_cache_hits": stats.device_hits, "device_cache_misses": stats.installs,
                "device_evictions": self.slots.evictions, "host_cache_hits": stats.host_hits,
                "host_cache_misses": stats.loads + stats.load_failures, "host_evictions": self.host.evictions,
                "load_failures": stats.load_failures}

    def status(self, name: str) -> AdapterStatus:
        """Versions, tiers and use counts of `name`; AdapterNotFound if it is not registered."""
        with self._lock:
            entry = self._entry(name)
        return self._status(entry)

    def statuses(self) -> list[AdapterStatus]:
        """`status` of every registered name, sorted by name."""
        return [self._status(entry) for entry in self.registry.entries()]

    def _status(self, entry: AdapterEntry) -> AdapterStatus:
        versions = []
        for digest in entry.versions:
            summary, problem = self._summary(entry.name, digest)
            with self._lock:
                tier: Tier = "device" if self.slots.holds(digest) else "host" if digest in self.host else "store"
                active = self._uses[(entry.name, digest)]
            versions.append(VersionStatus(digest, summary, tier, active, problem))
        return AdapterStatus(entry.name, entry.current, entry.pinned, tuple(versions), self._requests[entry.name])

    def _summary(self, name: str, digest: str) -> tuple[AdapterSummary | None, str]:
        summary = self._summaries.get(digest)
        if summary is None:
            try:
                summary = self._summaries[digest] = self.store.summary(name, digest)
            except (AdapterFormatError, VersionNotStored, OSError) as error:
                return None, str(error)
        return summary, ""
