"""Quota enforcement: each tenant's and adapter's usage against the limits in force (core/quota_config.py).

The scheduler asks `QuotaBook.accept` at submit, before the request takes any engine resource (a KV
sequence, an adapter lease): over any limit it raises Overloaded naming the limit and when to retry, and
nothing changes. Accepted requests are then followed through their life: `admitted` (it leaves the waiting
queue), `requeued` (preempted back into it), `generated` (a token, taken from the token buckets), `ended`.
Not thread-safe: the scheduler calls it under its own lock. `replace` swaps the limits while requests run:
usage is kept, buckets keep their level (capped to a smaller capacity; a new bucket starts full).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.server.core.errors import Overloaded
from loraplex.server.core.quota_config import Limits, QuotaSettings, ShareLimits


class TokenBucket:
    """Tokens refilled at `rate_per_s` up to `capacity`; taking more than it holds leaves it in debt (< 0)."""

    def __init__(self, capacity: int, rate_per_s: float, now: float, level: float | None = None) -> None:
        self.capacity, self.rate_per_s = capacity, rate_per_s
        self._level = capacity if level is None else min(level, capacity)
        self._at = now

    def level(self, now: float) -> float:
        """Tokens held at `now` (negative while in debt)."""
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate_per_s)
        self._at = now
        return self._level

    def wait_s(self, tokens: int, now: float) -> float:
        """Seconds until it holds `tokens` (at most its capacity); 0 when it does now."""
        missing = min(tokens, self.capacity) - self.level(now)
        return max(0.0, missing / self.rate_per_s)

    def take(self, tokens: int, now: float) -> None:
        self._level = self.level(now) - tokens

    def resized(self, limits: Limits, now: float) -> TokenBucket:
        """This bucket under new limits (its level kept, capped to the new capacity)."""
        return TokenBucket(limits.bucket_capacity(), limits.tokens_per_minute / 60.0, now, self.level(now))


def bucket_of(limits: Limits | None, now: float, old: TokenBucket | None = None) -> TokenBucket | None:
    """The token bucket `limits` ask for (None without a rate limit), continuing `old`'s level when there is one."""
    if limits is None or limits.tokens_per_minute is None:
        return None
    if old is not None:
        return old.resized(limits, now)
    return TokenBucket(limits.bucket_capacity(), limits.tokens_per_minute / 60.0, now)


@dataclass
class Usage:
    """One tenant's or adapter's requests now, and its token bucket."""

    in_flight: int = 0
    """Accepted and not ended: waiting or running."""
    queued: int = 0
    """Waiting for admission (preempted ones included)."""
    served_tokens: int = 0
    """Prompt tokens of admitted requests plus tokens generated, since start."""
    bucket: TokenBucket | None = field(default=None, repr=False)


@dataclass(frozen=True)
class QuotaStatus:
    """A read-out of one tenant or adapter: its limits and usage (`bucket_tokens` None without a rate limit)."""

    name: str
    limits: Limits
    in_flight: int
    queued: int
    served_tokens: int
    bucket_tokens: float | None


class QuotaBook:
    """Usage of every tenant and adapter under one QuotaSettings (see the module docstring)."""

    def __init__(self, settings: QuotaSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._tenants: dict[str, Usage] = {}
        self._adapters: dict[str, Usage] = {}

    def replace(self, settings: QuotaSettings) -> None:
        """Put `settings` in force now; requests already accepted are not refused afterwards."""
        now = self._clock()
        self.settings = settings
        for name, usage in self._tenants.items():
            usage.bucket = bucket_of(settings.limits_of(name), now, usage.bucket)
        for name, usage in self._adapters.items():
            usage.bucket = bucket_of(settings.adapter_limits(name), now, usage.bucket)

    def accept(self, tenant: str, adapter: str, prompt_tokens: int) -> None:
        """Count a new request of `tenant` on `adapter` ("" the base model), taking its prompt tokens from the
        buckets, or raise Overloaded for the first limit it would exceed (then nothing is counted)."""
        now, settings = self._clock(), self.settings
        tenant_limits, adapter_limits = settings.limits_of(tenant), settings.adapter_limits(adapter)
        tenant_usage = self._tenants.get(tenant) or Usage(bucket=bucket_of(tenant_limits, now))
        adapter_usage = self._adapters.get(adapter) or Usage(bucket=bucket_of(adapter_limits, now))
        _check(f"tenant {tenant!r}", tenant_usage, tenant_limits, prompt_tokens, now)
        if adapter_limits is not None:
            _check(f"adapter {adapter!r}" if adapter else "the base model", adapter_usage, adapter_limits,
                   prompt_tokens, now)
        self._tenants[tenant], self._adapters[adapter] = tenant_usage, adapter_usage
        for usage in (tenant_usage, adapter_usage):
            usage.in_flight += 1
            usage.queued += 1
            if usage.bucket is not None:
                usage.bucket.take(prompt_tokens, now)

    def admitted(self, tenant: str, adapter: str, prompt_tokens: int | None) -> None:
        """One of their requests left the waiting queue; `prompt_tokens` counts as served on its first
        admission (None after a preemption)."""
        for usage in (self._tenants[tenant], self._adapters[adapter]):
            usage.queued -= 1
            usage.served_tokens += prompt_tokens or 0

    def requeued(self, tenant: str, adapter: str) -> None:
        """One of their running requests was preempted back into the waiting queue."""
        self._tenants[tenant].queued += 1
        self._adapters[adapter].queued += 1

    def generated(self, tenant: str, adapter: str, tokens: int = 1) -> None:
        """`tokens` were generated for one of their requests (taken from their buckets)."""
        now = self._clock()
        for usage in (self._tenants[tenant], self._adapters[adapter]):
            usage.served_tokens += tokens
            if usage.bucket is not None:
                usage.bucket.take(tokens, now)

    def ended(self, tenant: str, adapter: str, waiting: bool) -> None:
        """One of their requests ended (finished, cancelled, failed), `waiting` if it had not been admitted."""
        for usage in (self._tenants[tenant], self._adapters[adapter]):
            usage.in_flight -= 1
            usage.queued -= waiting
        usage = self._adapters[adapter]
        if not usage.in_flight and usage.bucket is None:
            del self._adapters[adapter]  # adapters without a rate limit are followed only while in use

    def tenant_status(self, tenant: str) -> QuotaStatus:
        """`tenant`'s limits and usage now (no usage when it has sent nothing)."""
        return self._status(tenant, self.settings.limits_of(tenant), self._tenants.get(tenant), self._clock())

    def statuses(self) -> tuple[list[QuotaStatus], list[QuotaStatus]]:
        """(every configured or seen tenant, every adapter with limits or requests), each sorted by name."""
        now = self._clock()
        settings = self.settings
        tenants = [self.tenant_status(name) for name in sorted({*settings.tenants, *self._tenants})]
        adapters = [self._status(name, settings.adapter_limits(name) or ShareLimits(), self._adapters.get(name),
                                 now)
                    for name in sorted({*settings.adapters, *self._adapters})]
        return tenants, adapters

    def _status(self, name: str, limits: Limits, usage: Usage | None, now: float) -> QuotaStatus:
        usage = usage or Usage(bucket=bucket_of(limits, now))
        level = usage.bucket.level(now) if usage.bucket is not None else None
        return QuotaStatus(name, limits, usage.in_flight, usage.queued, usage.served_tokens, level)


def _check(who: str, usage: Usage, limits: Limits, prompt_tokens: int, now: float) -> None:
    """Overloaded when one more request of `prompt_tokens` would exceed `limits` (concurrency first)."""
    if limits.max_concurrent is not None and usage.in_flight >= limits.max_concurrent:
        raise Overloaded(f"{who} is over its max_concurrent of {limits.max_concurrent} requests in flight",
                         limit="max_concurrent")
    if limits.max_queued is not None and usage.queued >= limits.max_queued:
        raise Overloaded(f"{who} is over its max_queued of {limits.max_queued} waiting requests",
                         limit="max_queued")
    if usage.bucket is not None:
        wait = usage.bucket.wait_s(prompt_tokens, now)
        if wait > 0:
            held, needed = max(0, int(usage.bucket.level(now))), min(prompt_tokens, usage.bucket.capacity)
            raise Overloaded(f"{who} is over its tokens_per_minute of {limits.tokens_per_minute}: its bucket holds "
                             f"{held} of the {needed} tokens this prompt needs", retry_after_s=math.ceil(wait),
                             limit="tokens_per_minute")
