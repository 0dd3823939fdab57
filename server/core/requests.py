"""A request as the scheduler takes it (checked: token ids, sampling, the parsed adapter reference), the
server's request limits, and the stream of token events it answers with."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from loraplex.adapters.reference import AdapterReference
from loraplex.server.core.adapter_runtime.leases import AdapterLease
from loraplex.server.core.quota_config import ANONYMOUS_TENANT, Priority
from loraplex.server.engine import SamplingParams, TokenConstraint, TokenEvent

if TYPE_CHECKING:
    from loraplex.server.core.scheduler import Scheduler, _Entry


@dataclass(frozen=True)
class Request:
    """What a transport asks for, checked (core/validation.py): token ids only, no text and no tensors."""

    adapter: AdapterReference
    """The adapter's name and version prefix; leases.BASE_REFERENCE for the base model alone."""
    prompt_ids: list[int]
    sampling: SamplingParams
    cache_salt: str = ""
    """Prefix-cache blocks are shared only with requests of the same adapter version and salt ("" none)."""
    tenant: str = ANONYMOUS_TENANT
    """Who it is accounted to (quota_config.QuotaSettings.tenant_of its API key): quotas and fair shares."""
    priority: Priority = "interactive"
    """The class it asks for; a batch tenant's requests are batch whatever they ask (Scheduler.submit)."""
    constraint: TokenConstraint | None = None
    """Its next-token rule (structured output: a core/grammar.py matcher, its own); None: free."""



@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (settings; core/validation.py checks them)."""

    default_max_new_tokens: int
    """max_new_tokens of a request that sets none."""
    max_new_tokens_limit: int
    """The most max_new_tokens one request may ask for."""



class Queues(NamedTuple):
    """Adapter names ("" for the base model) of the running and of the waiting requests."""

    running: list[str]
    waiting: list[str]



class RequestStream:
    """One request's token events, in order; the last one has `finish_reason` set.

    Iterate it on the event loop that submitted it. `cancel()` (idempotent) stops generation and
    frees the request's KV blocks on the scheduler thread; iteration then ends without a final event.
    """

    def __init__(self, scheduler: Scheduler, lease: AdapterLease, loop: asyncio.AbstractEventLoop) -> None:
        self.lease = lease
        self._scheduler = scheduler
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent | BaseException | None] = asyncio.Queue()
        self._entry: _Entry | None = None

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    @property
    def queue_wait_s(self) -> float | None:
        """Seconds from submit to its first admission into the running batch (None while it has not been)."""
        entry = self._entry
        return None if entry.admitted_at is None else entry.admitted_at - entry.submitted_at

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the prefix cache held when the request was first admitted (0 before; known by its
        first event)."""
        return self._entry.cached_tokens or 0

    def cancel(self) -> None:
        self._scheduler._cancel(self._entry)

    def _put(self, item: TokenEvent | BaseException | None) -> None:
        self._queue.put_nowait(item)
