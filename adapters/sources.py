"""Where adapters come from: a source string is an absolute local folder under the allowed roots, or
`s3://bucket/prefix`. `AdapterSources` stores a source as a version of a name, or dry-runs validation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from botocore.client import BaseClient

from loraplex.adapters.s3_source import check_from_s3, put_from_s3
from loraplex.adapters.store import AdapterStore, SourceNotAllowed, StoredAdapter
from loraplex.adapters.validation import AdapterSummary

S3_SCHEME = "s3://"


class AdapterSources:
    """Reads sources into `store`; `s3_client` builds the boto3 S3 client on first S3 use."""

    def __init__(self, store: AdapterStore, s3_client: Callable[[], BaseClient]) -> None:
        self.store = store
        self._make_s3_client = s3_client
        self._s3: BaseClient | None = None

    def put(self, source: str, name: str) -> StoredAdapter:
        """Validate `source` and store it as a version of `name` (see AdapterStore.put, put_from_s3); an empty
        `source` takes the version of `name` the store holds already and stored last (AdapterStore.latest)."""
        if not source:
            return self.store.latest(name)
        if source.startswith(S3_SCHEME):
            return put_from_s3(self.store, self._s3_client(), source, name)
        return self.store.put(_local(source), name)

    def check(self, source: str) -> AdapterSummary:
        """Validate `source` without storing or loading anything."""
        if source.startswith(S3_SCHEME):
            return check_from_s3(self.store, self._s3_client(), source)
        return self.store.check(_local(source))

    def _s3_client(self) -> BaseClient:
        if self._s3 is None:
            self._s3 = self._make_s3_client()
        return self._s3


def _local(source: str) -> Path:
    if not source:
        raise SourceNotAllowed("the source is empty; give an absolute folder path or s3://bucket/prefix")
    return Path(source)
