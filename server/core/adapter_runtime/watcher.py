"""Watch files and load adapters as they appear, by polling (no inotify dependency; works on network file
systems), each watcher on its own daemon thread (`Poller`):

`AdapterWatcher`: a drop folder. `<watch_dir>/<NAME>/` holding a PEFT LoRA folder becomes the current version
of NAME, and every later change of its files a new version. A folder is loaded once its files' (size, mtime)
fingerprint has stayed the same for two consecutive polls, so a copy in progress is not read half-written (and
the store re-checks the digest after copying anyway). A folder that fails validation is logged once per
fingerprint and retried only when its files change. Removing a folder unloads nothing: unloading is an
explicit admin call.

`PromotionWatcher`: the store's serve-train record (adapters/training_runs.py). When it changed, the versions
serve-train promoted since are registered (AdminOperations.register_promoted), so a job that ran without
--server next to a running server is served by its name. serve-train writes the record after the version.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from loraplex.adapters.errors import AdapterFormatError
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loraplex.adapters.reference import InvalidAdapterReference
from loraplex.adapters.store import SourceChanged, SourceNotAllowed
from loraplex.adapters.training_runs import RUNS_FILE
from loraplex.server.core.adapter_runtime.manager import AdapterManager

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[int, int], ...]
"""(size, mtime_ns) of a folder's config and weights files."""


class Poller(ABC):
    """Calls `poll` every `interval_s` seconds on a daemon thread named `thread_name`, from `start` to `stop`;
    an OSError of one poll is logged (`_failed`) and the next poll tries again."""

    def __init__(self, interval_s: float, thread_name: str) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @abstractmethod
    def poll(self) -> list[str]:
        """One pass; returns the names whose current version changed."""

    @abstractmethod
    def _failed(self, error: OSError) -> None:
        """Log why a poll could not read what is watched."""

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except OSError as error:  # what is watched went away or is unreadable: try again later
                self._failed(error)


class AdapterWatcher(Poller):
    """Polls `folder` every `interval_s` seconds on a daemon thread and loads new or changed adapters."""

    def __init__(self, manager: AdapterManager, folder: Path, interval_s: float) -> None:
        super().__init__(interval_s, "loraplex-adapter-watch")
        self.manager = manager
        self.folder = folder
        self._seen: dict[str, Fingerprint] = {}
        """Fingerprint of each name at the previous poll."""
        self._done: dict[str, Fingerprint] = {}
        """Fingerprint each name was last loaded (or refused) at."""

    def poll(self) -> list[str]:
        """One pass over the folder; returns the names loaded."""
        loaded = []
        current = {entry.name: fingerprint for entry in sorted(self.folder.iterdir())
                   if entry.is_dir() and not entry.name.startswith(".") and (fingerprint := _fingerprint(entry))}
        for name, fingerprint in current.items():
            stable = self._seen.get(name) == fingerprint
            if stable and self._done.get(name) != fingerprint:
                self._done[name] = fingerprint
                if self._load(name):
                    loaded.append(name)
        self._seen = current
        return loaded

    def _load(self, name: str) -> bool:
        try:
            _, summary, changed = self.manager.load(str(self.folder / name), name)
        except (AdapterFormatError, InvalidAdapterReference, SourceNotAllowed, SourceChanged, OSError) as error:
            log.error("watched adapter folder %s refused: %s", self.folder / name, error)
            return False
        if changed:
            log.info("loaded adapter %r version %s from %s", name, summary.digest[:12], self.folder / name)
        return changed

    def _failed(self, error: OSError) -> None:
        log.error("cannot read the adapter watch folder %s: %s", self.folder, error)


class PromotionWatcher(Poller):
    """Polls `manager`'s store's serve-train record every `interval_s` seconds on a daemon thread and
    registers what serve-train promoted when the record changed (its size and mtime)."""

    def __init__(self, manager: AdapterManager, interval_s: float) -> None:
        super().__init__(interval_s, "loraplex-promotion-watch")
        self.manager = manager
        self.record = manager.store.root / RUNS_FILE
        self._seen = self._record_fingerprint()
        """The record's fingerprint when it was last acted on (start-up registered what it held then)."""

    def poll(self) -> list[str]:
        fingerprint = self._record_fingerprint()
        if fingerprint == self._seen:
            return []
        self._seen = fingerprint
        return self.manager.register_promoted()

    def _record_fingerprint(self) -> tuple[int, int] | None:
        try:
            stat = self.record.stat()
        except FileNotFoundError:
            return None
        return stat.st_size, stat.st_mtime_ns

    def _failed(self, error: OSError) -> None:
        log.error("cannot read the training record %s: %s", self.record, error)


def _fingerprint(folder: Path) -> Fingerprint | None:
    """(size, mtime) of the folder's PEFT files, or None if either is missing."""
    try:
        stats = [(folder / name).stat() for name in (CONFIG_FILE, WEIGHTS_FILE)]
    except OSError:
        return None
    return tuple((stat.st_size, stat.st_mtime_ns) for stat in stats)
