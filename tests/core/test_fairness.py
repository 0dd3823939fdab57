"""The admission order (core/fairness.py): virtual token counters give backlogged tenants served tokens in
proportion to their weights, a tenant arriving late banks no credit, interactive before batch, round-robin
across a tenant's adapters, and with fairness off round-robin across adapters alone."""

from __future__ import annotations

import itertools
import math

import pytest

from loraplex.server.core.fairness import AdmissionQueue, VirtualTokenCounters


def queue_of(weights: dict[str, float], fair: bool = True) -> AdmissionQueue[str]:
    return AdmissionQueue(fair, lambda tenant: weights.get(tenant, 1.0))


def serve(queue: AdmissionQueue[str], admissions: int, cost: dict[str, int], refill: bool = True) -> dict[str, int]:
    """Admit `admissions` times (each request served `cost[tenant]` tokens at once), pushing a new request of
    the same tenant for each one taken when `refill` (tenants stay backlogged); tokens served per tenant."""
    served: dict[str, int] = {}
    for _ in range(admissions):
        key = next(queue.candidates())
        entry = queue.pop(key)
        queue.charge(key.tenant, cost[key.tenant])
        served[key.tenant] = served.get(key.tenant, 0) + cost[key.tenant]
        if refill:
            queue.push(entry, key)
    return served


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 1.0}, {"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 2.5}])
def test_backlogged_tenants_are_served_tokens_in_proportion_to_their_weights(weights):
    queue = queue_of(weights)
    for tenant in weights:
        for i in range(4):
            queue.push(f"{tenant}{i}", queue.key("interactive", tenant, "x"))
    served = serve(queue, 2000, {"a": 30, "b": 7})  # a's requests are 30 tokens, b's 7: tokens, not requests
    share = served["a"] / (served["a"] + served["b"])
    assert share == pytest.approx(weights["a"] / (weights["a"] + weights["b"]), rel=0.01)


def test_a_tenant_arriving_late_banks_no_credit():
    queue = queue_of({})
    queue.push("a0", queue.key("interactive", "a", "x"))
    assert serve(queue, 100, {"a": 10}) == {"a": 1000}  # a alone for a while
    queue.push("b0", queue.key("interactive", "b", "x"))
    assert queue.counters.value("b") == math.nextafter(queue.counters.value("a"), 0)  # just below: it goes first
    assert queue.head(next(queue.candidates())) == "b0"
    served = serve(queue, 20, {"a": 10, "b": 10})
    assert served == {"a": 100, "b": 100}, "b alternates with a instead of catching up on a's 1000 tokens"


def test_a_tenant_returning_after_idling_starts_from_the_backlog_not_from_its_old_counter():
    counters = VirtualTokenCounters()
    counters.charge("b", 50, 1.0)
    counters.charge("a", 500, 1.0)
    counters.lift("b", ["a"])
    assert counters.value("b") == math.nextafter(500, 0)  # just below the backlogged minimum
    counters.charge("c", 10, 1.0)
    counters.left("a")  # nobody is backlogged now: the last one to leave sets the floor
    counters.lift("c", [])
    assert counters.value("c") == 500
    counters.charge("d", 900, 1.0)
    counters.lift("d", ["a"])
    assert counters.value("d") == 900, "lifting never lowers a counter"


def test_every_interactive_request_goes_before_any_batch_one():
    queue = queue_of({"cheap": 1.0})
    queue.push("batch-1", queue.key("batch", "cheap", "x"))
    queue.push("batch-2", queue.key("batch", "idle", "x"))
    queue.charge("busy", 10_000)  # far over its share, yet interactive
    queue.push("interactive-1", queue.key("interactive", "busy", "x"))
    order = [queue.pop(next(queue.candidates())) for _ in range(3)]
    assert order[0] == "interactive-1"
    assert sorted(order[1:]) == ["batch-1", "batch-2"]


def test_a_tenants_adapters_take_turns_fifo_within_each():
    queue = queue_of({})
    for name in ["x1", "x2", "x3", "y1", "z1"]:
        queue.push(name, queue.key("interactive", "t", name[0]))
    order = [queue.pop(next(queue.candidates())) for _ in range(5)]
    assert order == ["x1", "y1", "z1", "x2", "x3"]
    assert len(queue) == 0


@pytest.mark.parametrize("fair", [True, False])
def test_a_tenants_adapters_take_turns_in_proportion_to_their_weights(fair):
    """Weights x:y:z = 3:1:1 (both with fairness on, inside a tenant, and off): of every 5 admissions while
    all three wait, x gets 3; an adapter that comes back after idling banks no turns."""
    weights = {"x": 3.0, "y": 1.0, "z": 1.0}
    queue = AdmissionQueue(fair, lambda tenant: 1.0, lambda adapter: weights.get(adapter, 1.0))
    for adapter in "xyz":
        for i in range(60):
            queue.push(f"{adapter}{i}", queue.key("interactive", "t", adapter))
    order = [queue.pop(next(queue.candidates())) for _ in range(25)]
    counts = {adapter: sum(name[0] == adapter for name in order) for adapter in "xyz"}
    assert counts == {"x": 15, "y": 5, "z": 5}
    for name in [e for e in list(queue) if e[0] == "z"]:
        queue.remove(name, queue.key("interactive", "t", "z"))
    for _ in range(10):  # x and y take turns while z has nothing waiting
        queue.pop(next(queue.candidates()))
    queue.push("z-new", queue.key("interactive", "t", "z"))
    order = [queue.pop(next(queue.candidates())) for _ in range(5)]
    assert order.count("z-new") == 1 and sum(name[0] == "x" for name in order) >= 2


def test_without_fairness_tenants_and_classes_are_ignored():
    queue = queue_of({"a": 100.0}, fair=False)
    requests = [("a1", "batch", "a", "x"), ("a2", "interactive", "a", "x"), ("b1", "interactive", "b", "y")]
    for name, priority, tenant, adapter in requests:
        queue.push(name, queue.key(priority, tenant, adapter))
    queue.charge("b", 10_000)  # not counted
    order = [queue.pop(next(queue.candidates())) for _ in range(3)]
    assert order == ["a1", "b1", "a2"]


def test_a_preempted_request_goes_back_to_the_head_of_its_queue_and_remove_finds_waiting_entries():
    queue = queue_of({})
    key = queue.key("interactive", "t", "x")
    for name in ["r1", "r2"]:
        queue.push(name, key)
    first = queue.pop(key)
    queue.push(first, key, front=True)
    assert queue.head(key) == "r1"
    assert queue.remove("r2", key) and not queue.remove("r2", key)
    assert list(queue) == ["r1"] and len(queue) == 1


def test_ties_go_to_the_tenant_admitted_least_recently():
    queue = queue_of({})
    for tenant, i in itertools.product("abc", range(2)):
        queue.push(f"{tenant}{i}", queue.key("interactive", tenant, "x"))
    order = [queue.pop(next(queue.candidates())) for _ in range(6)]  # nothing charged: every counter ties
    assert {name[0] for name in order[:3]} == {"a", "b", "c"}, "each tenant once before any goes twice"
