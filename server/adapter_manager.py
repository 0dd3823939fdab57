"""Adapters from the registry to the engine's slots: what the scheduler and the admin API call.

Tiers, nearest first: device slots (`DeviceSlots`, engine.num_slots of them) <- host memory
(`HostCache`, an LRU within a byte budget) <- the store on disk (`AdapterStore`, versions by digest).

One request's adapter, step by step:
  1. `acquire` (at submit): resolve "NAME" or "NAME@VERSION" in the registry and count one use of
     that version; the lease fixes the version, so a later hot-swap of NAME does not change it.
  2. `slot_for` (scheduler thread, when the request is admitted): the slot holding the version; else
     copy it from the host cache into an empty or least recently used idle slot; else start loading it
     from the store on a worker thread and answer None: the request keeps waiting while others run,
     and the scheduler is woken (`wake`) when the load ends.
  3. `release` (when the request ends): one use less. A version no longer registered and no longer
     used leaves every tier and its files are deleted.
Counted uses are what make `unload` refuse (or wait); the busy slots the scheduler passes in are what
keep eviction away from running sequences; pinned names keep their current version in a slot.

Locking: `_lock` guards counts, tiers and loading state and is never held while calling `wake`
(which takes the scheduler's lock; the scheduler calls in here holding it, so the order is always
scheduler -> manager). `_admin` serializes the changes of names (registering, unload, pin) with the
deletion of files, so a version being re-registered is never deleted underneath; copying a source
into the store happens outside both locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

from botocore.exceptions import BotoCoreError

from loraplex.adapters.errors import AdapterFormatError
from loraplex.adapters.host_cache import HostCache
from loraplex.adapters.loading import load_version
from loraplex.adapters.reference import InvalidAdapterReference, check_name, parse_reference
from loraplex.adapters.registry import AdapterEntry, AdapterRegistry, UnknownAdapter
from loraplex.adapters.s3_source import S3SourceError
from loraplex.adapters.sources import AdapterSources
from loraplex.adapters.store import SourceChanged, SourceNotAllowed, VersionNotStored
from loraplex.adapters.validation import AdapterSummary
from loraplex.server.adapter_slots import DeviceSlots
from loraplex.server.engine import Engine
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.errors import AdapterNotFound, FailedPrecondition, InvalidRequest

log = logging.getLogger(__name__)
T = TypeVar("T")

BASE_MODEL = ""
"""The adapter reference that means the base model alone."""
Tier = Literal["device", "host", "store"]
ADMIN_WORKERS = 4
BACKGROUND_NICE = 10
"""Niceness of the threads that read, hash and check adapters: serving latency comes first."""
LOAD_ATTEMPTS = 3
"""Tries of `load` when a concurrent unload of the same version deletes its files between store and register."""


@dataclass(frozen=True)
class AdapterLease:
    """One request's use of one adapter version (counted until `release`)."""

    name: str
    """Adapter name ("" for the base model)."""
    version: str
    """Content digest of the version the request runs with ("" for the base model)."""


BASE_LEASE = AdapterLease(BASE_MODEL, "")


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


@dataclass
class AdapterStats:
    """Counters since start (read without the lock: approximate while loads run)."""

    loads: int = 0
    """Versions read from the store into host memory."""
    load_failures: int = 0
    installs: int = 0
    """Versions copied into a device slot (device-tier misses)."""
    device_hits: int = 0
    """Admissions whose version was already in a slot (counted by the scheduler)."""
    host_hits: int = 0
    """Versions copied into a slot straight from host memory (no store read needed)."""
    read_s: float = 0.0
    """Seconds spent reading stored files (and checking digests), summed over loads."""
    validate_s: float = 0.0
    """Seconds spent parsing and checking loaded tensors, summed over loads."""


class AdapterManager:
    """Names, versions and tiers of the adapters served by `engine` (see the module docstring)."""

    def __init__(self, engine: Engine, registry: AdapterRegistry, sources: AdapterSources, host_cache_bytes: int,
                 load_workers: int = 2, max_versions: int = 8,
                 on_load_phase: Callable[[str, float], None] | None = None) -> None:
        """`on_load_phase(phase, seconds)` hears the duration of each load phase: "read" and "validate" (on a
        loader thread), "copy" into a slot (on the scheduler thread)."""
        self.engine = engine
        self._on_load_phase = on_load_phase
        self.registry = registry
        self.sources = sources
        self.store = sources.store
        self.max_versions = max_versions
        self.slots = DeviceSlots(engine.num_slots)
        self.host = HostCache(host_cache_bytes)
        self.stats = AdapterStats()
        self._lock = threading.Condition()
        self._admin = threading.Lock()
        self._executor = ThreadPoolExecutor(load_workers, thread_name_prefix="loraplex-adapter-load",
                                            initializer=lower_thread_priority)
        self.admin_executor = ThreadPoolExecutor(ADMIN_WORKERS, thread_name_prefix="loraplex-adapter-admin",
                                                 initializer=lower_thread_priority)
        """Where admin calls run (`run_admin` from the event loop): load, validate, unload, ..."""
        self._uses: Counter[tuple[str, str]] = Counter()
        self._version_uses: Counter[str] = Counter()
        self._requests: Counter[str] = Counter()
        self._summaries: dict[str, AdapterSummary] = {}
        self._loading: set[str] = set()
        self._loaded_for_slot: set[str] = set()
        """Versions read from the store whose first copy into a slot is still to come (not a host hit)."""
        self._failed: dict[str, FailedPrecondition] = {}
        self._warm: dict[str, str] = {}
        """digest -> name of versions to place in a slot when one is idle (pins and prefetches)."""
        self._pinned: set[str] = set()
        self._retiring: set[tuple[str, str]] = set()
        """Versions being unregistered: new requests for them are refused."""
        self._max_pending = engine.num_slots
        """Most versions loading or loaded-and-waiting for a slot at once (bounds held host memory)."""
        self._wake: Callable[[], None] = lambda: None
        with self._lock:
            self._refresh_pins()

    async def run_admin(self, function: Callable[..., T], *args: object) -> T:
        """`function(*args)` on the low-priority admin threads, awaited from the event loop (transports'
        load, unload, validate, ... calls do disk and network I/O and hashing; serving goes on meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self.admin_executor, function, *args)

    def on_ready(self, wake: Callable[[], None]) -> None:
        """Call `wake` (without arguments, from any thread) whenever a load ends or a slot should be filled."""
        self._wake = wake

    def close(self) -> None:
        """Stop the loader and admin threads (work in progress finishes first)."""
        self.admin_executor.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- requests (scheduler) --------------------------------------------------------------------

    def acquire(self, reference: str) -> AdapterLease:
        """The version `reference` names now, counted as used until `release`.

        Raises InvalidRequest (malformed or ambiguous reference) or AdapterNotFound.
        """
        if reference == BASE_MODEL:
            return BASE_LEASE
        with self._lock:
            try:
                name, digest = self.registry.resolve(reference)
            except InvalidAdapterReference as error:
                raise InvalidRequest("adapter", str(error)) from None
            except UnknownAdapter as error:
                raise AdapterNotFound(str(error)) from None
            if (name, digest) in self._retiring:
                raise AdapterNotFound(f"adapter {name!r} version {digest[:12]} is being unloaded")
            self._uses[(name, digest)] += 1
            self._version_uses[digest] += 1
            self._requests[name] += 1
        return AdapterLease(name, digest)

    def release(self, lease: AdapterLease) -> None:
        """End one use of `lease`'s version; an unregistered version's last use removes it everywhere."""
        if lease == BASE_LEASE:
            return
        key, digest = (lease.name, lease.version), lease.version
        with self._lock:
            self._uses[key] -= 1
            if not self._uses[key]:
                del self._uses[key]
            self._version_uses[digest] -= 1
            if not self._version_uses[digest]:
                del self._version_uses[digest]
                self._failed.pop(digest, None)
                if digest not in self._warm:
                    self.host.release_hold(digest)
            orphaned = key not in self._uses and not self._is_registered(*key)
            if orphaned:
                self._forget_tiers(digest)
            self._lock.notify_all()
        if orphaned:
            self._executor.submit(self._delete_files, *key)

    def resident_slot(self, lease: AdapterLease) -> int | None:
        """NO_ADAPTER for the base model, the slot holding the version, or None if no slot holds it."""
        if lease == BASE_LEASE:
            return NO_ADAPTER
        with self._lock:
            return self.slots.find(lease.version)

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

    # -- administration --------------------------------------------------------------------------

    def load(self, source: str, name: str, warm: bool = False) -> tuple[AdapterEntry, AdapterSummary, bool]:
        """Validate and store `source`, then make it the current version of `name` in one step (requests
        already holding the old version finish on it). `warm` also starts placing it in a slot.
        Returns the entry, the version's summary, and whether the current version changed.

        Raises SourceNotAllowed, S3SourceError, InvalidAdapterReference, AdapterFormatError, SourceChanged.
        """
        for _ in range(LOAD_ATTEMPTS):
            stored = self.sources.put(source, name)  # slow (disk, S3): outside the locks; idempotent per digest
            with self._admin:
                if not stored.path.is_dir():  # an unload of this very version deleted it meanwhile: again
                    continue
                changed = self._current(name) != stored.digest
                entry = self.registry.register(name, stored.digest)  # the swap (a file write: not under _lock)
                with self._lock:
                    self._summaries[stored.digest] = stored.summary
                    self._refresh_pins()
                    if warm or entry.pinned:
                        self._warm_version(name, stored.digest)
                    extra = len(entry.versions) - self.max_versions
                    doomed = [d for d in entry.versions if d != entry.current and (name, d) not in self._uses]
                    doomed = self._retire(name, doomed[:max(extra, 0)])
                self._unregister(name, doomed)
                break
        else:
            raise SourceChanged(f"adapter {name!r} was unloaded while {source} was being stored; retry")
        self._wake()
        return self.registry.entry(name), stored.summary, changed

    def validate(self, source: str) -> AdapterSummary:
        """Dry run: validate `source` as `load` would; stores and loads nothing."""
        return self.sources.check(source)

    def unload(self, name: str, version: str = "", wait: bool = False,
               timeout_s: float | None = None) -> tuple[tuple[str, ...], bool]:
        """Unregister `name` (every version) or only its old version `version` (a digest prefix): new
        requests get NOT_FOUND at once. With requests still holding it, `wait=False` refuses
        (FailedPrecondition) and changes nothing; `wait=True` unregisters, then waits up to `timeout_s`
        for them to finish. Their files are deleted once unused. Returns the digests unregistered and
        whether no request uses them any more."""
        with self._admin:
            with self._lock:
                entry = self._entry(name)
                digests = entry.versions if not version else (self._match(entry, version),)
                if version and digests[0] == entry.current:
                    raise FailedPrecondition(f"version {entry.current[:12]} is the current version of {name!r}; "
                                             "load another version first, or unload the adapter")
                in_use = sum(self._uses[(name, digest)] for digest in digests)
                if in_use and not wait:
                    raise FailedPrecondition(f"adapter {name!r} is serving {in_use} request(s); retry when they "
                                             "finish, or unload with wait")
                self._retire(name, digests)
            try:
                removed = self.registry.remove(name, version)
            except BaseException:
                with self._lock:
                    self._retiring.difference_update((name, digest) for digest in digests)
                raise
            self._unregister(name, removed)
        with self._lock:
            return removed, self._lock.wait_for(lambda: not any((name, d) in self._uses for d in removed), timeout_s)

    def pin(self, name: str, pinned: bool) -> AdapterEntry:
        """Keep (or stop keeping) `name`'s current version in a device slot, across versions and restarts.

        At most num_slots - 1 names are pinned, so one slot always serves the others (FailedPrecondition).
        """
        with self._admin:
            self._entry(name)
            pinned_names = [e.name for e in self.registry.entries() if e.pinned and e.name != name]
            if pinned and len(pinned_names) + 1 >= self.engine.num_slots:
                raise FailedPrecondition(f"{len(pinned_names)} adapters are pinned and the server has "
                                         f"{self.engine.num_slots} slots; one must stay unpinned: unpin one of "
                                         f"{sorted(pinned_names)} or raise engine.num_slots")
            entry = self.registry.set_pinned(name, pinned)
            with self._lock:
                self._refresh_pins()
        self._wake()
        return entry

    def prefetch(self, reference: str) -> AdapterLease:
        """Hint: load the version `reference` names into host memory and a device slot ahead of use."""
        with self._lock:
            name, digest = self._resolve(reference)
            self._warm_version(name, digest)
        self._wake()
        return AdapterLease(name, digest)

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
        or failed)."""
        stats = self.stats
        return {"device_cache_hits": stats.device_hits, "device_cache_misses": stats.installs,
                "device_evictions": self.slots.evictions, "host_cache_hits": stats.host_hits,
                "host_cache_misses": stats.loads + stats.load_failures, "host_evictions": self.host.evictions}

    def status(self, name: str) -> AdapterStatus:
        """Versions, tiers and use counts of `name`; AdapterNotFound if it is not registered."""
        with self._lock:
            entry = self._entry(name)
        return self._status(entry)

    def statuses(self) -> list[AdapterStatus]:
        """`status` of every registered name, sorted by name."""
        return [self._status(entry) for entry in self.registry.entries()]

    # -- internals -------------------------------------------------------------------------------

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

    def _entry(self, name: str) -> AdapterEntry:
        """The registered `name`: InvalidRequest("name") if it is malformed, AdapterNotFound if unknown."""
        try:
            return self.registry.entry(check_name(name))
        except InvalidAdapterReference as error:
            raise InvalidRequest("name", str(error)) from None
        except UnknownAdapter as error:
            raise AdapterNotFound(str(error)) from None

    def _resolve(self, reference: str) -> tuple[str, str]:
        try:
            return self.registry.resolve(reference)
        except InvalidAdapterReference as error:
            raise InvalidRequest("adapter", str(error)) from None
        except UnknownAdapter as error:
            raise AdapterNotFound(str(error)) from None

    def _match(self, entry: AdapterEntry, version: str) -> str:
        return self._resolve(f"{entry.name}@{version}")[1]

    def _current(self, name: str) -> str | None:
        try:
            return self.registry.entry(name).current
        except UnknownAdapter:
            return None

    def _is_registered(self, name: str, digest: str) -> bool:
        try:
            return digest in self.registry.entry(name).versions
        except UnknownAdapter:
            return False

    def _refresh_pins(self) -> None:
        """Recompute the pinned digests (current versions of pinned names). Holds `_lock`."""
        self._pinned = {entry.current for entry in self.registry.entries() if entry.pinned}
        for entry in self.registry.entries():
            if entry.pinned and not self.slots.holds(entry.current):
                self._warm_version(entry.name, entry.current)

    def _warm_version(self, name: str, digest: str) -> None:
        """Load `digest` into host memory (held) and ask for a slot. Holds `_lock`."""
        self._warm[digest] = name
        self._start_load(name, digest)

    def _start_load(self, name: str, digest: str) -> None:
        """Load `digest` on a worker thread unless it is loading, loaded, or too many loads are pending."""
        if digest in self._loading or digest in self.host:
            return
        if len(self._loading) + self.host.num_held >= self._max_pending:
            return
        self._loading.add(digest)
        self._executor.submit(self._load, name, digest)

    def _load(self, name: str, digest: str) -> None:
        """Worker thread: read one version from the store into the host cache, held for its slot."""
        try:
            loaded = load_version(self.store.path(name, digest), digest, self.engine.spec, self.store.limits,
                                  self.engine.dtype)
        except (AdapterFormatError, VersionNotStored, OSError) as error:
            log.error("adapter %r version %s cannot be loaded: %s", name, digest[:12], error)
            with self._lock:
                self._loading.discard(digest)
                self.stats.load_failures += 1
                self._warm.pop(digest, None)
                if digest in self._version_uses:
                    self._failed[digest] = FailedPrecondition(
                        f"adapter {name!r} version {digest[:12]} cannot be loaded: {error}")
        else:
            with self._lock:
                self._loading.discard(digest)
                wanted = digest in self._version_uses or digest in self._warm
                self.host.put(loaded, hold=wanted)
                self._loaded_for_slot.add(digest)
                self.stats.loads += 1
                self.stats.read_s += loaded.read_s
                self.stats.validate_s += loaded.validate_s
            if self._on_load_phase is not None:
                self._on_load_phase("read", loaded.read_s)
                self._on_load_phase("validate", loaded.validate_s)
        self._wake()

    def _forget_tiers(self, digest: str) -> None:
        """Drop `digest` from the slots and host memory unless another name still has it. Holds `_lock`."""
        if any(digest in entry.versions for entry in self.registry.entries()) or digest in self._version_uses:
            return
        self.slots.forget(digest)
        self.host.discard(digest)
        self._loaded_for_slot.discard(digest)
        self._warm.pop(digest, None)

    def _retire(self, name: str, digests: Collection[str]) -> list[str]:
        """Refuse new requests for these versions of `name` until `_unregister` is done. Holds `_lock`."""
        self._retiring.update((name, digest) for digest in digests)
        return list(digests)

    def _unregister(self, name: str, digests: Collection[str]) -> None:
        """Remove retired versions from the registry (already done by the caller when absent there), drop
        the unused ones from the tiers and delete their files. Holds `_admin`, not `_lock`."""
        for digest in digests:
            if self._is_registered(name, digest):
                self.registry.remove(name, digest)
        with self._lock:
            self._retiring.difference_update((name, digest) for digest in digests)
            self._refresh_pins()
            unused = [digest for digest in digests if (name, digest) not in self._uses]
            for digest in unused:
                self._forget_tiers(digest)
        for digest in unused:
            self._delete_files_locked(name, digest)

    def _delete_files(self, name: str, digest: str) -> None:
        with self._admin:
            self._delete_files_locked(name, digest)

    def _delete_files_locked(self, name: str, digest: str) -> None:
        """Delete the stored files of (name, digest) unless it was registered again. Holds `_admin`."""
        with self._lock:
            if self._is_registered(name, digest):
                return
        with contextlib.suppress(VersionNotStored):  # already gone
            self.store.remove(name, digest)


@contextlib.contextmanager
def request_errors(adapter_format: bool = True) -> Iterator[None]:
    """Map the adapters package's refusals (sources, names, formats) to request errors for any transport;
    AdapterFormatError passes through when `adapter_format` is False (a dry-run validation reports it)."""
    try:
        yield
    except InvalidAdapterReference as error:
        raise InvalidRequest("name", str(error)) from None
    except AdapterFormatError as error:  # before S3SourceError: an S3 prefix without adapter files is both
        if not adapter_format:
            raise
        raise InvalidRequest("source", str(error)) from None
    except (SourceNotAllowed, S3SourceError) as error:
        raise InvalidRequest("source", str(error)) from None
    except BotoCoreError as error:  # credentials, endpoint: the server's configuration, not the request
        raise FailedPrecondition(f"source: S3 cannot be used: {error}") from None
    except SourceChanged as error:
        raise FailedPrecondition(f"source: {error}") from None


def lower_thread_priority() -> None:
    """Thread initializer: run this thread at BACKGROUND_NICE (Linux keeps a niceness per thread), so loads
    and admin work take the CPU only when the scheduler and the engine's threads leave it free."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def check_reference(reference: str) -> str:
    """The adapter name in `reference` ("" for the base model); InvalidRequest if it is malformed."""
    if reference == BASE_MODEL:
        return BASE_MODEL
    try:
        return parse_reference(reference)[0]
    except InvalidAdapterReference as error:
        raise InvalidRequest("adapter", str(error)) from None
