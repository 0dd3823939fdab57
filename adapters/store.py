"""The local adapter store: validated PEFT folders at `<root>/<name>/<digest>/`, each written atomically.

A version folder appears in one rename, complete and fsynced, or not at all: `put` copies into
`<root>/.tmp/<pid>-<random>/`, checks that the copy has the digest validation computed from the
source, and renames it into place. A crash leaves only a hidden temp folder, which the next store
opened on the same root removes once its process is gone. Sources are local folders under the
configured allowed roots, symlinks resolved: nothing outside those roots is ever read (the store's own
folder counts as allowed: its versions were validated, and its temp folders are where remote sources
and trained adapters are put together).
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.durable import fsync_dir
from loraplex.adapters.errors import shown
from loraplex.adapters.identity import adapter_digest
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loraplex.adapters.reference import DIGEST, check_name
from loraplex.adapters.validation import CARD_FILE, AdapterSummary, Limits, validate
from loraplex.server.engine.spec import ModelSpec

STORED_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
"""What a version folder holds (the card is optional); anything else in a source folder is not copied."""
_TEMP = ".tmp"


class SourceNotAllowed(ValueError):
    """The source path is relative, missing, or resolves (symlinks followed) outside the allowed roots."""


class SourceChanged(RuntimeError):
    """The source's files changed while they were copied; the copy was discarded. Retry."""


class VersionNotStored(LookupError):
    """No folder for this name and digest in the store."""


@dataclass(frozen=True)
class StoredAdapter:
    """One version in the store."""

    name: str
    path: Path
    summary: AdapterSummary

    @property
    def digest(self) -> str:
        return self.summary.digest


class AdapterStore:
    """Adapters validated against one base model, stored under `root`, read from `allowed_roots`."""

    def __init__(self, root: Path, spec: ModelSpec, limits: Limits, allowed_roots: Sequence[Path] = (),
                 base_digest: str | None = None) -> None:
        self.root = root.resolve()
        self.limits = limits
        self._spec, self._base_digest = spec, base_digest
        (self.root / _TEMP).mkdir(parents=True, exist_ok=True)
        self._allowed = tuple(Path(allowed).resolve(strict=True) for allowed in allowed_roots)
        self._remove_abandoned_temps()

    def put(self, source: Path, name: str) -> StoredAdapter:
        """Validate the adapter in `source` and store it as a version of `name` (idempotent per digest).

        Raises SourceNotAllowed, InvalidAdapterReference (name), an AdapterFormatError subclass
        (validation), or SourceChanged; in every case no new version is visible.
        """
        check_name(name)
        folder, files = self._allowed_source(source)
        summary = self.check(folder)
        target = self.root / name / summary.digest
        with self.temp_folder() as temp:
            for file, path in files.items():
                _copy_durably(path, temp / file)
            fsync_dir(temp)
            if adapter_digest(temp) != summary.digest:
                raise SourceChanged(f"{source} changed while it was copied into the store; retry when it is "
                                    "written completely")
            target.parent.mkdir(exist_ok=True)
            fsync_dir(self.root)
            try:
                temp.rename(target)  # the version appears here, complete
            except OSError:
                if not target.is_dir():  # not "already stored" (a put of the same bytes)
                    raise
            fsync_dir(target.parent)
        return StoredAdapter(name, target, summary)

    def check(self, source: Path) -> AdapterSummary:
        """Dry run of `put`: validate the adapter in `source` (allowed roots apply); stores nothing."""
        folder, _ = self._allowed_source(source)
        return validate(folder, self._spec, self.limits, self._base_digest)

    @contextmanager
    def temp_folder(self) -> Iterator[Path]:
        """A new empty folder in the store's hidden temp area (an allowed source), deleted on exit."""
        temp = self.root / _TEMP / f"{socket.gethostname()}@{os.getpid()}-{uuid.uuid4().hex}"
        temp.mkdir()
        try:
            yield temp
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def path(self, name: str, digest: str) -> Path:
        """The folder of version `digest` of `name`; VersionNotStored if the store does not hold it."""
        folder = self.root / check_name(name) / digest
        if not DIGEST.fullmatch(digest) or not folder.is_dir():
            raise VersionNotStored(f"the store has no version {digest[:12]} of adapter {name!r}")
        return folder

    def summary(self, name: str, digest: str) -> AdapterSummary:
        """Validation's summary of a stored version (re-validated: limits may have changed since it was put)."""
        return validate(self.path(name, digest), self._spec, self.limits, self._base_digest)

    def latest(self, name: str) -> StoredAdapter:
        """The version of `name` stored last (its folder's modification time: when its files were written),
        re-validated; VersionNotStored if the store holds none."""
        folder = self.root / check_name(name)
        stored = [entry for entry in folder.iterdir() if DIGEST.fullmatch(entry.name)] if folder.is_dir() else []
        if not stored:
            raise VersionNotStored(f"the store holds no version of adapter {name!r}; give a source to load it from")
        newest = max(stored, key=lambda entry: (entry.stat().st_mtime_ns, entry.name))
        return StoredAdapter(name, newest, self.summary(name, newest.name))

    def versions(self, name: str) -> list[str]:
        """Digests of the stored versions of `name`, sorted."""
        folder = self.root / check_name(name)
        return sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []

    def remove(self, name: str, digest: str) -> None:
        """Delete one version: it disappears in one rename, then its files are deleted."""
        folder = self.path(name, digest)
        with self.temp_folder() as doomed:
            folder.rename(doomed)  # onto the empty temp folder
            fsync_dir(folder.parent)

    def _allowed_source(self, source: Path) -> tuple[Path, dict[str, Path]]:
        """`source` resolved and {file name: resolved path} of its STORED_FILES, if each of them resolves
        inside one of the allowed roots."""
        if not source.is_absolute():
            raise SourceNotAllowed(f"{shown(str(source))} is a relative path; give an absolute path under the "
                                   "allowed roots")
        try:
            folder = source.resolve(strict=True)
        except OSError as error:
            raise SourceNotAllowed(f"{shown(str(source))} cannot be read ({error.strerror}); give an existing "
                                   "folder") from None
        files = {file: (folder / file).resolve() for file in STORED_FILES if (folder / file).exists()}
        for path in (folder, *files.values()):
            if not any(path.is_relative_to(root) for root in (*self._allowed, self.root)):
                roots = ", ".join(map(str, self._allowed)) or "none configured"
                raise SourceNotAllowed(f"{shown(str(source))} resolves to {path}, outside the allowed adapter roots "
                                       f"({roots}); "
                                       "copy the adapter under one of them or add its folder to the allowed roots")
        return folder, files

    def _remove_abandoned_temps(self) -> None:
        """Delete temp folders left by processes of this host that no longer run (a crash during put or
        remove). Folders are named HOST@PID-...; another host's are left to it, since its pids mean
        nothing here (a store on a filesystem shared across machines, e.g. a multi-node training job)."""
        here = socket.gethostname()
        for entry in (self.root / _TEMP).iterdir():
            host, _, rest = entry.name.rpartition("@")
            pid = rest.partition("-")[0]
            if host in ("", here) and not (pid.isdigit() and _is_running(int(pid))):
                shutil.rmtree(entry, ignore_errors=True)


def _copy_durably(source: Path, target: Path) -> None:
    """Copy one file's bytes (never following a symlink at `source`) and fsync the copy."""
    with open(os.open(source, os.O_RDONLY | os.O_NOFOLLOW), "rb") as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def _is_running(pid: int) -> bool:
    """Whether process `pid` exists (a positive pid; 0 would address our own process group)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
