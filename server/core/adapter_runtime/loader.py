"""Loading: versions read from the store into host memory on low-priority worker threads.

At most engine.num_slots versions are loading or loaded-and-waiting for a slot at once (bounding held
host memory); a version that cannot be loaded fails the requests holding it (FailedPrecondition).
"""

from __future__ import annotations

import logging

from loraplex.adapters.errors import AdapterFormatError
from loraplex.adapters.loading import load_version
from loraplex.adapters.store import VersionNotStored
from loraplex.server.core.adapter_runtime.state import AdapterState
from loraplex.server.core.errors import FailedPrecondition

log = logging.getLogger(__name__)


class Loader(AdapterState):
    """Reading versions into the host tier, and dropping them from the tiers."""

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
