"""The adapter runtime's shared state: what every part of it (leases, placement, loading, admin
operations, read-outs) reads and changes, its two locks, its worker threads, and registry look-ups.

Locking: `_lock` guards counts, tiers and loading state and is never held while calling `_wake`
(which takes the scheduler's lock; the scheduler calls in here holding it, so the order is always
scheduler -> runtime). `_admin` serializes the changes of names (registering, unload, pin) with the
deletion of files, so a version being re-registered is never deleted underneath; copying a source
into the store happens outside both locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from loraplex.adapters.host_cache import HostCache
from loraplex.adapters.reference import AdapterReference, InvalidAdapterReference, check_name, parse_reference
from loraplex.adapters.registry import AdapterEntry, AdapterRegistry, UnknownAdapter
from loraplex.adapters.sources import AdapterSources
from loraplex.adapters.validation import AdapterSummary
from loraplex.server.core.adapter_runtime.slots import DeviceSlots
from loraplex.server.core.errors import AdapterNotFound, FailedPrecondition, InvalidRequest
from loraplex.server.engine import Engine
from loraplex.server.engine.cpu_threads import single_threaded

T = TypeVar("T")

ADMIN_WORKERS = 4
BACKGROUND_NICE = 10
"""Niceness of the threads that read, hash and check adapters: serving latency comes first."""


@dataclass
class AdapterStats:
    """Counters since start (read without the lock: approximate while loads run)."""

    loads: int = 0
    """Versions read from the store into host memory."""
    load_failures: int = 0
    installs: int = 0
    """Versions copied into a device slot (device-tier misses)."""
    device_hits: int = 0
    """Admissions whose version was already in a slot (`count_device_hit`, from the scheduler)."""
    host_hits: int = 0
    """Versions copied into a slot straight from host memory (no store read needed)."""
    read_s: float = 0.0
    """Seconds spent reading stored files (and checking digests), summed over loads."""
    validate_s: float = 0.0
    """Seconds spent parsing and checking loaded tensors, summed over loads."""



class AdapterState:
    """The state of the adapters served by `engine`; the runtime's parts are mixins over it."""

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
        self._card_constraints: dict[str, tuple[str, str] | None] = {}
        """digest -> its card's default constraint (cards.py)."""
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

    def _entry(self, name: str) -> AdapterEntry:
        """The registered `name`: InvalidRequest("name") if it is malformed, AdapterNotFound if unknown."""
        try:
            return self.registry.entry(check_name(name))
        except InvalidAdapterReference as error:
            raise InvalidRequest("name", str(error)) from None
        except UnknownAdapter as error:
            raise AdapterNotFound(str(error)) from None

    def _resolve(self, reference: AdapterReference) -> str:
        """The digest `reference` names now: InvalidRequest("adapter") if its version prefix is ambiguous,
        AdapterNotFound if the name or the version is unknown."""
        try:
            return self.registry.version(reference)
        except InvalidAdapterReference as error:
            raise InvalidRequest("adapter", str(error)) from None
        except UnknownAdapter as error:
            raise AdapterNotFound(str(error)) from None

    def _match(self, entry: AdapterEntry, version: str) -> str:
        return self._resolve(checked_reference(f"{entry.name}@{version}"))

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


def checked_reference(reference: str) -> AdapterReference:
    """The parsed "NAME" or "NAME@VERSION"; InvalidRequest("adapter") if it is malformed."""
    try:
        return parse_reference(reference)
    except InvalidAdapterReference as error:
        raise InvalidRequest("adapter", str(error)) from None


def lower_thread_priority() -> None:
    """Thread initializer: run this thread at BACKGROUND_NICE (Linux keeps a niceness per thread), so loads
    and admin work take the CPU only when the scheduler and the engine's threads leave it free; and its torch ops
    on itself alone (no OpenMP team beside the engine thread's: core/engine_thread.py)."""
    single_threaded()
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
