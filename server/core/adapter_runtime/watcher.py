"""Watch a drop folder and load adapters as they appear: `<watch_dir>/<NAME>/` holding a PEFT LoRA
folder becomes the current version of NAME, and every later change of its files a new version.

Polling (no inotify dependency; works on network file systems): a folder is loaded once its files'
(size, mtime) fingerprint has stayed the same for two consecutive polls, so a copy in progress is not
read half-written (and the store re-checks the digest after copying anyway). A folder that fails
validation is logged once per fingerprint and retried only when its files change. Removing a folder
unloads nothing: unloading is an explicit admin call.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from loraplex.adapters.errors import AdapterFormatError
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loraplex.adapters.reference import InvalidAdapterReference
from loraplex.adapters.store import SourceChanged, SourceNotAllowed
from loraplex.server.core.adapter_runtime.manager import AdapterManager

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[int, int], ...]
"""(size, mtime_ns) of a folder's config and weights files."""


class AdapterWatcher:
    """Polls `folder` every `interval_s` seconds on a daemon thread and loads new or changed adapters."""

    def __init__(self, manager: AdapterManager, folder: Path, interval_s: float) -> None:
        self.manager = manager
        self.folder = folder
        self.interval_s = interval_s
        self._seen: dict[str, Fingerprint] = {}
        """Fingerprint of each name at the previous poll."""
        self._done: dict[str, Fingerprint] = {}
        """Fingerprint each name was last loaded (or refused) at."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraplex-adapter-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

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

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except OSError as error:  # the folder itself went away or is unreadable: try again later
                log.error("cannot read the adapter watch folder %s: %s", self.folder, error)


def _fingerprint(folder: Path) -> Fingerprint | None:
    """(size, mtime) of the folder's PEFT files, or None if either is missing."""
    try:
        stats = [(folder / name).stat() for name in (CONFIG_FILE, WEIGHTS_FILE)]
    except OSError:
        return None
    return tuple((stat.st_size, stat.st_mtime_ns) for stat in stats)
