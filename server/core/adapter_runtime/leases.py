"""Request leases: one request's use of one adapter version, counted from submit to its end.

`acquire` resolves a parsed reference (NAME, or NAME@VERSION; parsed once, where the request is checked:
core/validation.py) in the registry and counts one use of that version; the lease fixes the version, so
a later hot-swap of NAME does not change it. `release` ends the use; a version no longer registered and
no longer used leaves every tier and its files are deleted. Counted uses are what make `unload` refuse
(or wait).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.adapters.reference import AdapterReference
from loraplex.server.core.adapter_runtime.state import AdapterState
from loraplex.server.core.errors import AdapterNotFound

BASE_MODEL = ""
"""The adapter reference that means the base model alone."""


@dataclass(frozen=True)
class AdapterLease:
    """One request's use of one adapter version (counted until `release`)."""

    name: str
    """Adapter name ("" for the base model)."""
    version: str
    """Content digest of the version the request runs with ("" for the base model)."""


BASE_LEASE = AdapterLease(BASE_MODEL, "")
BASE_REFERENCE = AdapterReference(BASE_MODEL)
"""The reference of a request for the base model alone."""


class Leases(AdapterState):
    """Counting requests' uses of adapter versions."""

    def acquire(self, reference: AdapterReference) -> AdapterLease:
        """The version `reference` names now, counted as used until `release`.

        Raises InvalidRequest (an ambiguous version prefix) or AdapterNotFound.
        """
        if reference == BASE_REFERENCE:
            return BASE_LEASE
        with self._lock:
            name, digest = reference.name, self._resolve(reference)
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

