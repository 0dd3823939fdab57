"""Adapter names and references: "NAME" (the current version) or "NAME@VERSION" (a digest prefix)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraplex.adapters.errors import shown

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Letters, digits, '.', '_', '-', at most 64 characters, starting with a letter or digit (so a name is
always a plain folder name: never '.', '..', hidden, or containing a path separator)."""
DIGEST = re.compile(r"[0-9a-f]{64}")
"""A full version: the sha256 of the adapter's config + weights, lowercase hex."""
MIN_VERSION_PREFIX = 8
VERSION_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_VERSION_PREFIX},64}}")
"""A version in a reference: the adapter's sha256 (hex) or a prefix of at least MIN_VERSION_PREFIX digits."""


class InvalidAdapterReference(ValueError):
    """A malformed adapter name or reference (maps to INVALID_ARGUMENT); the message says the rule."""


def check_name(name: str) -> str:
    """`name` if it is a valid adapter name, else InvalidAdapterReference."""
    if not ADAPTER_NAME.fullmatch(name):
        raise InvalidAdapterReference(f"adapter name {shown(name)} is not allowed: use letters, digits, '.', '_', '-' "
                                      "(at most 64 characters, starting with a letter or digit)")
    return name


@dataclass(frozen=True)
class AdapterReference:
    """A parsed reference: the adapter's name and a version prefix ("" names its current version)."""

    name: str
    version: str = ""


def parse_reference(reference: str) -> AdapterReference:
    """The AdapterReference of "NAME" (version "") or "NAME@VERSION"; InvalidAdapterReference otherwise."""
    name, at, version = reference.partition("@")
    check_name(name)
    if at and not VERSION_PREFIX.fullmatch(version):
        raise InvalidAdapterReference(f"version {shown(version)} in {shown(reference)} is not {MIN_VERSION_PREFIX} "
                                      "to 64 lowercase hex digits of the adapter's sha256")
    return AdapterReference(name, version)
