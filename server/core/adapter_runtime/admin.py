"""Admin operations: registering a source under a name, validating, unloading, pinning, prefetching,
registering what serve-train promoted in the store; and the mapping of the adapters package's refusals to
request errors (`request_errors`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator

from botocore.exceptions import BotoCoreError

from loraplex.adapters.errors import AdapterFormatError
from loraplex.adapters.reference import InvalidAdapterReference
from loraplex.adapters.registry import AdapterEntry
from loraplex.adapters.s3_source import S3SourceError
from loraplex.adapters.store import SourceChanged, SourceNotAllowed, VersionNotStored
from loraplex.adapters.training_runs import promoted_versions
from loraplex.adapters.validation import AdapterSummary
from loraplex.server.core.adapter_runtime.leases import AdapterLease
from loraplex.server.core.adapter_runtime.state import AdapterState, checked_reference
from loraplex.server.core.errors import AdapterNotFound, FailedPrecondition, InvalidRequest

log = logging.getLogger(__name__)

LOAD_ATTEMPTS = 3
"""Tries of `load` when a concurrent unload of the same version deletes its files between store and register."""


class AdminOperations(AdapterState):
    """Changes of names and versions (serialized by `_admin`), run on the admin threads."""

    def load(self, source: str, name: str, warm: bool = False) -> tuple[AdapterEntry, AdapterSummary, bool]:
        """Validate and store `source` (empty: the version of `name` stored last), then make it the current
        version of `name` in one step (requests already holding the old version finish on it). `warm` also
        starts placing it in a slot.
        Returns the entry, the version's summary, and whether the current version changed.

        Raises SourceNotAllowed, S3SourceError, InvalidAdapterReference, AdapterFormatError, SourceChanged,
        VersionNotStored (an empty source, and no version stored).
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

    def register_promoted(self, skip: Collection[str] = ()) -> list[str]:
        """Make the version that each name's latest succeeded serve-train run promoted in the store
        (training_runs.promoted_versions) its current version, unless the registry has already held that version
        under the name (it was registered, or replaced or removed since: the admin's choice stands) or the name
        is in `skip` (given explicitly at start-up). So a version trained without --server is served by its
        name. A version that fails validation here (trained on another base, above this server's limits) is
        logged and skipped. Returns the names whose current version changed."""
        held = {entry.name: entry.versions for entry in self.registry.entries()}
        changed_names = []
        for name, digest in sorted(promoted_versions(self.store.root).items()):
            if name in skip or digest in held.get(name, ()):
                continue
            try:
                _, _, changed = self.load(str(self.store.path(name, digest)), name)
            except VersionNotStored:
                continue  # deleted from the store since it was trained
            except (AdapterFormatError, InvalidAdapterReference, SourceNotAllowed, SourceChanged) as error:
                log.error("adapter %r version %s that serve-train stored is not served: %s", name, digest[:12],
                          error)
                continue
            if changed:
                log.info("serving adapter %r version %s, stored and promoted by serve-train", name, digest[:12])
                changed_names.append(name)
        return changed_names

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
        parsed = checked_reference(reference)
        with self._lock:
            digest = self._resolve(parsed)
            self._warm_version(parsed.name, digest)
        self._wake()
        return AdapterLease(parsed.name, digest)

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
    except VersionNotStored as error:  # an empty source: the store's latest version, and there is none
        raise AdapterNotFound(str(error)) from None
