"""Adapters from S3: `s3://bucket/prefix` holds a PEFT folder's files under `prefix/`.

Only the files a store version holds are fetched (config, safetensors weights, optional card; never
a pickled `.bin`), after checking their sizes against the store's limit, into one of the store's
temp folders; `AdapterStore.put` then validates and stores them as for a local folder.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from loraplex.adapters.errors import AdapterFormatError
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loraplex.adapters.store import STORED_FILES, AdapterStore, StoredAdapter
from loraplex.adapters.validation import AdapterSummary, Limits, check_size

_URI = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?")
_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3SourceError(RuntimeError):
    """The S3 location is malformed, lacks the adapter files, or cannot be read; the message says which."""


class S3AdapterMissing(S3SourceError, AdapterFormatError):
    """The S3 location holds no PEFT adapter files (a refusal of the adapter, like a local folder's)."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    """Key prefix of the adapter's files, "" or ending in "/"."""

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """`s3://bucket` or `s3://bucket/prefix` (a trailing "/" is optional)."""
        match = _URI.fullmatch(uri)
        if match is None:
            raise S3SourceError(f"{uri!r} is not s3://BUCKET/PREFIX (bucket: 3-63 lowercase letters, digits, '.', "
                                "'-')")
        prefix = (match.group(2) or "").strip("/")
        return cls(match.group(1), f"{prefix}/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def put_from_s3(store: AdapterStore, client: BaseClient, uri: str, name: str) -> StoredAdapter:
    """Fetch the adapter at `uri` with the boto3 S3 `client` and store it as a version of `name`.

    Raises S3SourceError, AdapterTooLarge (before downloading), or whatever `AdapterStore.put` raises.
    """
    with store.temp_folder() as folder:
        fetch_from_s3(client, uri, folder, store.limits)
        return store.put(folder, name)


def check_from_s3(store: AdapterStore, client: BaseClient, uri: str) -> AdapterSummary:
    """Dry run of `put_from_s3`: fetch into a temp folder and validate; stores nothing."""
    with store.temp_folder() as folder:
        fetch_from_s3(client, uri, folder, store.limits)
        return store.check(folder)


def fetch_from_s3(client: BaseClient, uri: str, folder: Path, limits: Limits) -> None:
    """Download the adapter files at `uri` into the empty `folder`, after checking their size against `limits`."""
    location = S3Location.parse(uri)
    sizes = {file: _size(client, location, file) for file in STORED_FILES}
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if sizes[required] is None:
            raise S3AdapterMissing(f"{location} has no {required}; check the bucket name, and upload the PEFT "
                                f"folder's {CONFIG_FILE} and {WEIGHTS_FILE} under that prefix")
    check_size(sizes[CONFIG_FILE] + sizes[WEIGHTS_FILE], limits)
    for file, size in sizes.items():
        if size is not None:
            _download(client, location, file, folder / file)


def _size(client: BaseClient, location: S3Location, file: str) -> int | None:
    """Size of the object for `file`, or None if there is none."""
    try:
        return client.head_object(Bucket=location.bucket, Key=location.prefix + file)["ContentLength"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in _MISSING:
            return None
        raise _unreadable(location, file, error) from None
    except BotoCoreError as error:
        raise _unreadable(location, file, error) from None


def _download(client: BaseClient, location: S3Location, file: str, target: Path) -> None:
    try:
        body = client.get_object(Bucket=location.bucket, Key=location.prefix + file)["Body"]
        with body, open(target, "xb") as handle:
            shutil.copyfileobj(body, handle, 1 << 20)
    except (ClientError, BotoCoreError) as error:
        raise _unreadable(location, file, error) from None


def _unreadable(location: S3Location, file: str, error: Exception) -> S3SourceError:
    return S3SourceError(f"cannot read {location}{file}: {error}; check the bucket, the prefix and the "
                         "server's S3 credentials")
