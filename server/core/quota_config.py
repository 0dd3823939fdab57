"""Tenants and their quotas, as configured (settings.quotas, or the `[quotas]` table of settings.quotas_file).

A tenant is who a request is accounted to: each API key is a tenant of its own name unless a `tenants`
entry lists it in `keys` (then the keys of that entry share one tenant, its name); with no API keys every
caller is the one tenant ANONYMOUS_TENANT. A tenant's limits are its `tenants` entry, or `default` when it
has none; an adapter's are its `adapters` entry (none: no limits of its own). The scheduler enforces them
(server/core/quotas.py) and orders admission by them (server/core/fairness.py). Validated like every other
setting: at start-up, and again on each reload (SIGHUP, TenantAdmin.ReloadQuotas), where a bad file is
refused and the quotas in force stay.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraplex.adapters.reference import ADAPTER_NAME

Priority = Literal["interactive", "batch"]
"""Priority classes, highest first: every waiting interactive request is admitted before any batch one."""
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")
ANONYMOUS_TENANT = "anonymous"
"""The tenant of every caller when no API keys are configured (the name of auth.ANONYMOUS)."""


class Limits(BaseModel):
    """What one tenant (or adapter) may hold; None is no limit of its own (the server's still apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_concurrent: int | None = Field(default=None, ge=1, le=1_000_000)
    """Most of its requests in flight (waiting or running) at once; one more is refused (RESOURCE_EXHAUSTED,
    HTTP 429)."""
    max_queued: int | None = Field(default=None, ge=1, le=1_000_000)
    """Most of its requests waiting for admission at once; one more is refused."""
    tokens_per_minute: int | None = Field(default=None, ge=1, le=10**12)
    """Token rate (prompt plus generated tokens), as a token bucket refilled at this rate: a request is refused
    while the bucket holds fewer tokens than its prompt (or, for a prompt larger than the bucket, until it is
    full). Prompt tokens are taken when the request is accepted, generated ones as they are generated, so a
    long generation may leave the bucket in debt."""
    burst_tokens: int | None = Field(default=None, ge=1, le=10**12)
    """Capacity of that bucket (it starts full); unset holds one minute of tokens_per_minute."""

    @model_validator(mode="after")
    def _check_burst(self) -> Limits:
        if self.burst_tokens is not None and self.tokens_per_minute is None:
            raise ValueError("burst_tokens needs tokens_per_minute (it is the capacity of that bucket)")
        return self

    def bucket_capacity(self) -> int | None:
        """Tokens the rate limit's bucket holds when full; None without a rate limit."""
        if self.tokens_per_minute is None:
            return None
        return self.burst_tokens or self.tokens_per_minute


class ShareLimits(Limits):
    """A tenant's or adapter's share and class besides its limits."""

    weight: float = Field(default=1.0, gt=0.0, le=1e6)
    """Share while others compete. A tenant's: weighted fair queuing over tokens served (two backlogged tenants
    of weights 3 and 1 are served about 3:1 prompt plus generated tokens). An adapter's: its turns among the
    adapters of each tenant that has requests waiting on it (weighted round-robin: weights 3 and 1 admit about
    3 of the first's requests for 1 of the second's)."""
    priority: Priority = "interactive"
    """The class of its requests: "batch" requests are admitted only when no interactive one waits. A request
    may ask for "batch" itself; a request of a batch tenant, or on a batch adapter, is always batch."""


class TenantQuota(ShareLimits):
    """One `tenants` entry: limits, and the API keys it groups."""

    keys: frozenset[str] = frozenset()
    """Names of the API keys (settings.api_keys[].name) whose requests are this tenant's; empty: only the key
    named like the tenant (or, with no API keys, the anonymous caller for the tenant named "anonymous")."""


class QuotaSettings(BaseModel):
    """Every tenant's and adapter's limits; reloadable while the server runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    tenants: dict[str, TenantQuota] = Field(default_factory=dict)
    """Tenants by name (letters, digits, '.', '_', '-'; at most 64), with their limits and keys."""
    default: ShareLimits = ShareLimits()
    """Limits of each tenant without an entry in `tenants` (each has its own counters): by default weight 1, no
    limits, interactive."""
    adapters: dict[str, ShareLimits] = Field(default_factory=dict)
    """Limits per adapter name, over the requests of every tenant on it ("" is the base model), with its turns'
    weight and class."""

    @model_validator(mode="after")
    def _check_names(self) -> QuotaSettings:
        for name in self.tenants:
            if not ADAPTER_NAME.fullmatch(name):
                raise ValueError(f"tenant name {name!r}: use letters, digits, '.', '_', '-' (at most 64)")
        owners: dict[str, str] = {}
        for name, tenant in self.tenants.items():
            for key in tenant.keys:
                if key in owners:
                    raise ValueError(f"API key {key!r} is listed by tenants {owners[key]!r} and {name!r}")
                owners[key] = name
        for name in self.adapters:
            if name and not ADAPTER_NAME.fullmatch(name):
                raise ValueError(f"adapters: {name!r} is not an adapter name (\"\" is the base model)")
        return self

    def check_key_names(self, key_names: Collection[str]) -> None:
        """ValueError when a tenant lists an API key that is not configured (a typo would group nothing)."""
        for name, tenant in self.tenants.items():
            unknown = sorted(tenant.keys - set(key_names))
            if unknown:
                raise ValueError(f"tenant {name!r} lists API keys that are not configured: {', '.join(unknown)}")

    def tenant_of(self, key_name: str) -> str:
        """The tenant of the API key named `key_name` (the anonymous caller's name is ANONYMOUS_TENANT)."""
        for name, tenant in self.tenants.items():
            if key_name in tenant.keys:
                return name
        return key_name

    def limits_of(self, tenant: str) -> ShareLimits:
        """`tenant`'s entry, or `default`."""
        return self.tenants.get(tenant, self.default)

    def adapter_limits(self, adapter: str) -> ShareLimits | None:
        """The limits of adapter `adapter` ("" the base model), None when it has none."""
        return self.adapters.get(adapter)

    def adapter_weight(self, adapter: str) -> float:
        """`adapter`'s weight among a tenant's adapters (1 when it has no entry)."""
        limits = self.adapters.get(adapter)
        return 1.0 if limits is None else limits.weight

    def is_batch(self, tenant: str, adapter: str) -> bool:
        """Whether every request of `tenant` on `adapter` is batch class (the tenant's or the adapter's)."""
        limits = self.adapters.get(adapter)
        return self.limits_of(tenant).priority == "batch" or (limits is not None and limits.priority == "batch")


def read_quota_file(path: Path) -> QuotaSettings:
    """The `[quotas]` table of the TOML file `path` (its other tables are ignored, so it may be the server's
    --config file), validated. Raises ValueError saying what is wrong (missing file, TOML syntax, a bad value)."""
    try:
        table = tomllib.loads(path.read_text()).get("quotas", {})
        return QuotaSettings.model_validate(table)
    except OSError as error:
        raise ValueError(f"cannot read the quotas file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"quotas file {path} is not valid TOML: {error}") from None
    except ValidationError as error:
        raise ValueError(f"quotas file {path}: {error}") from None
