"""Which waiting request the scheduler admits next: priority classes, then weighted fair queuing over tenants,
then round-robin over each tenant's adapters, then FIFO.

Weighted fair queuing is the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models", OSDI
2024): each tenant has a counter advanced by the tokens it is served (prompt tokens as the steps compute them, one
per generated token; the scheduler counts a prompt from its admission while it plans) divided by its weight, and the
backlogged tenant (one with waiting requests) of the smallest counter goes first, so backlogged tenants are served
tokens in proportion to their weights. A tenant that becomes backlogged has its counter lifted to just below the
smallest counter of the tenants already backlogged (the next float down; or, when none is, to that of the last one
to leave the backlog): time spent idle banks no credit to spend later at the others' expense, and its request goes
first, so a light tenant's request is never queued behind a flooding one's (nor counted level with it, see
scheduler.py). Ties go to the tenant admitted least recently.

Inside one tenant, its adapters take turns (weighted round-robin, FIFO per adapter), so a busy adapter cannot
starve a cold one: each adapter's turn counter grows by 1/weight per request admitted, the adapter of the
lowest counter goes next (ties in round-robin order, a newly waiting adapter last), and an adapter whose queue
fills again is lifted to the lowest counter of the tenant's other waiting adapters, as tenants are; with equal
weights that is plain round-robin. Across priority classes, interactive requests all go before batch ones
(`quota_config.PRIORITIES`). With `fair` off every request falls in one class and one tenant: weighted
round-robin across adapters alone.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, NamedTuple, TypeVar

from loraplex.server.core.quota_config import PRIORITIES, Priority

E = TypeVar("E")


class QueueKey(NamedTuple):
    """Where a waiting request queues: its class, tenant and adapter ("" tenant and "interactive" when not fair)."""

    priority: Priority
    tenant: str
    adapter: str


class VirtualTokenCounters:
    """Per-tenant virtual token counters: tokens served over weight, lifted when a tenant becomes backlogged."""

    def __init__(self) -> None:
        self._counters: dict[str, float] = {}
        self._last_left = 0.0
        """The counter of the last tenant to leave the backlog: where a tenant arriving at an idle server starts."""

    def value(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def charge(self, tenant: str, tokens: int, weight: float) -> None:
        """`tenant` was served `tokens` tokens."""
        self._counters[tenant] = self.value(tenant) + tokens / weight

    def lift(self, tenant: str, backlogged: Iterable[str]) -> None:
        """`tenant` becomes backlogged next to `backlogged` (the tenants already waiting): no banked credit."""
        others = [self.value(other) for other in backlogged]
        floor = math.nextafter(min(others), -math.inf) if others else self._last_left
        self._counters[tenant] = max(self.value(tenant), floor)

    def left(self, tenant: str) -> None:
        """`tenant` has no waiting request any more."""
        self._last_left = self.value(tenant)

    def lower(self, tenant: str, others: Iterable[str]) -> None:
        """Put `tenant` level with the lowest of `others` if it is above them (it goes first among equals)."""
        self._counters[tenant] = min(self.value(tenant), *(self.value(other) for other in others))


class AdmissionQueue(Generic[E]):
    """The waiting requests, by class, tenant and adapter; `candidates()` is the admission order.

    `weight_of(tenant)` and `adapter_weight_of(adapter)` are read at each charge and each admission, so reloaded
    weights apply from then on."""

    def __init__(self, fair: bool, weight_of: Callable[[str], float],
                 adapter_weight_of: Callable[[str], float] = lambda adapter: 1.0) -> None:
        self.fair = fair
        self._weight_of = weight_of
        self._adapter_weight_of = adapter_weight_of
        self.counters = VirtualTokenCounters()
        self._turns: dict[tuple[Priority, str], VirtualTokenCounters] = {}
        """Per class and tenant: its adapters' turn counters (requests admitted over weight)."""
        self._queues: dict[Priority, OrderedDict[str, OrderedDict[str, deque[E]]]] = {p: OrderedDict()
                                                                                     for p in PRIORITIES}
        self._waiting: dict[str, int] = {}
        """Waiting requests per tenant, over the classes (a tenant is backlogged while it has some)."""
        self._size = 0

    def key(self, priority: Priority, tenant: str, adapter: str) -> QueueKey:
        """Where a request of `tenant` in class `priority` on `adapter` queues."""
        return QueueKey(priority, tenant, adapter) if self.fair else QueueKey("interactive", "", adapter)

    def push(self, entry: E, key: QueueKey, front: bool = False) -> None:
        """Queue `entry` at the back of its adapter's queue (`front`: at its head, e.g. a preempted request, and
        its adapter first in the tenant's turn)."""
        if not self._waiting.get(key.tenant):
            self.counters.lift(key.tenant, [t for t, count in self._waiting.items() if count])
        tenants = self._queues[key.priority]
        if key.tenant not in tenants:  # it was not admitted while it waited for nothing: first among equals
            tenants[key.tenant] = OrderedDict()
            tenants.move_to_end(key.tenant, last=False)
        adapters = tenants[key.tenant]
        turns = self._turns.setdefault((key.priority, key.tenant), VirtualTokenCounters())
        if key.adapter not in adapters:
            turns.lift(key.adapter, adapters)
        queue = adapters.setdefault(key.adapter, deque())
        if front:
            queue.appendleft(entry)
            adapters.move_to_end(key.adapter, last=False)
            turns.lower(key.adapter, adapters)
        else:
            queue.append(entry)
        self._waiting[key.tenant] = self._waiting.get(key.tenant, 0) + 1
        self._size += 1

    def candidates(self) -> Iterator[QueueKey]:
        """Every non-empty queue, best first: classes in order, tenants by counter (ties: least recently
        admitted first), each tenant's adapters by turn counter (ties in round-robin order)."""
        for priority in PRIORITIES:
            tenants = self._queues[priority]
            order = sorted(tenants, key=self.counters.value) if len(tenants) > 1 else list(tenants)
            for tenant in order:
                adapters = tenants[tenant]
                turns = self._turns[(priority, tenant)]
                for adapter in sorted(adapters, key=turns.value) if len(adapters) > 1 else list(adapters):
                    yield QueueKey(priority, tenant, adapter)

    def head(self, key: QueueKey) -> E:
        return self._queues[key.priority][key.tenant][key.adapter][0]

    def pop(self, key: QueueKey) -> E:
        """Take the head of `key`'s queue: that adapter goes to the back of its tenant's turn, the tenant to the
        back of the ties."""
        tenants = self._queues[key.priority]
        adapters = tenants[key.tenant]
        entry = adapters[key.adapter].popleft()
        turns = self._turns[(key.priority, key.tenant)]
        turns.charge(key.adapter, 1, self._adapter_weight_of(key.adapter))
        if adapters[key.adapter]:
            adapters.move_to_end(key.adapter)
        else:
            del adapters[key.adapter]
            turns.left(key.adapter)
        if adapters:
            tenants.move_to_end(key.tenant)
        else:
            del tenants[key.tenant]
        self._left(key.tenant)
        return entry

    def remove(self, entry: E, key: QueueKey) -> bool:
        """Take `entry` out of its queue (a cancel); False when it is not waiting."""
        adapters = self._queues[key.priority].get(key.tenant, {})
        queue = adapters.get(key.adapter)
        if queue is None or entry not in queue:
            return False
        queue.remove(entry)
        if not queue:
            del adapters[key.adapter]
            self._turns[(key.priority, key.tenant)].left(key.adapter)
            if not adapters:
                del self._queues[key.priority][key.tenant]
        self._left(key.tenant)
        return True

    def backlogged(self, tenant: str) -> bool:
        """Whether `tenant` has waiting requests."""
        return bool(self._waiting.get(tenant))

    def charge(self, tenant: str, tokens: int) -> None:
        """`tenant` was served `tokens` tokens (a no-op when not fair)."""
        if self.fair:
            self.counters.charge(tenant, tokens, self._weight_of(tenant))

    def share_order(self, tenant: str) -> float:
        """How far `tenant` is over its share (its counter): preemption takes from the largest first."""
        return self.counters.value(tenant)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[E]:
        """Every waiting entry (in no particular order)."""
        for tenants in self._queues.values():
            for adapters in tenants.values():
                for queue in adapters.values():
                    yield from queue

    def clear(self) -> None:
        for tenants in self._queues.values():
            tenants.clear()
        self._turns.clear()
        self._waiting.clear()
        self._size = 0

    def _left(self, tenant: str) -> None:
        self._size -= 1
        self._waiting[tenant] -= 1
        if not self._waiting[tenant]:
            del self._waiting[tenant]
            self.counters.left(tenant)
