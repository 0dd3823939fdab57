"""Scheduler: continuous batching equals each request run alone; fairness, preemption, bounds, cancel."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import pytest
import torch

from loraplex.adapters.reference import AdapterReference
from loraplex.server.core.errors import AdapterNotFound, Overloaded, ShuttingDown
from loraplex.server.core.requests import Request, RequestStream
from loraplex.server.core.scheduler import Scheduler
from loraplex.server.core.scheduler_config import SchedulerConfig
from loraplex.server.engine import SamplingParams
from loraplex.server.engine.lora import NO_ADAPTER
from serving_support import active_requests, adapter_manager, generate_alone, make_engine

#: KV bytes per block of the tiny llama (2 layers, 2 kv heads, head_dim 16, float32, block_size 4).
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4


def build(serving_model, engine_overrides=None, **config) -> Scheduler:
    base, adapters = serving_model
    engine = make_engine(base, **(engine_overrides or {}))
    store = Path(tempfile.mkdtemp(prefix="scheduler-store-"))
    return Scheduler(engine, adapter_manager(engine, adapters, store), SchedulerConfig(**config))


@pytest.fixture(scope="module")
def reference_engine(serving_model):
    base, adapters = serving_model
    return make_engine(base, adapters)


def mixed_requests(serving_model, count: int, max_new_tokens: int) -> list[Request]:
    """Prompts of varied lengths over the base and every adapter; every third one sampled with a seed."""
    names = ["", *serving_model[1]]
    generator = torch.Generator().manual_seed(3)
    requests = []
    for i in range(count):
        prompt = torch.randint(0, 96, (3 + (7 * i) % 37,), generator=generator).tolist()
        sampling = (SamplingParams(max_new_tokens=max_new_tokens, temperature=0.9, top_k=20, seed=i, ignore_eos=True)
                    if i % 3 == 2 else SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
        requests.append(Request(AdapterReference(names[i % len(names)]), prompt, sampling))
    return requests


async def tokens(stream: RequestStream) -> list[int]:
    return [event.token_id async for event in stream]


def assert_alone_equal(serving_model, reference_engine, requests, outputs) -> None:
    adapters = serving_model[1]
    for i, (request, output) in enumerate(zip(requests, outputs, strict=True)):
        name = request.adapter.name
        expected = generate_alone(reference_engine, adapters, request.prompt_ids, name, request.sampling)
        assert output == expected, f"request {i} ({name or 'base'}) differs from running alone"


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_concurrent_mixed_requests_equal_each_run_alone(serving_model, reference_engine):
    scheduler = build(serving_model, max_running=5, max_step_tokens=16)  # chunked prefill, a waiting queue
    scheduler.start()
    try:
        requests = mixed_requests(serving_model, 12, max_new_tokens=12)
        outputs = await asyncio.gather(*(tokens(scheduler.submit(r)) for r in requests))
    finally:
        scheduler.close()
    assert_alone_equal(serving_model, reference_engine, requests, outputs)
    assert len({tuple(o) for o in outputs}) > 6, "adapters and sampling should vary the outputs"
    assert scheduler.engine.cache.free_blocks == scheduler.engine.cache.num_blocks
    assert all(active_requests(scheduler.adapters, name) == 0 for name in serving_model[1])


async def test_kv_pressure_preempts_and_outputs_stay_exact(serving_model, reference_engine):
    scheduler = build(serving_model, engine_overrides=dict(kv_cache_bytes=20 * BLOCK_BYTES), max_running=8)
    assert scheduler.engine.cache.num_blocks == 20
    scheduler.start()
    try:
        requests = mixed_requests(serving_model, 6, max_new_tokens=16)  # 2 to 14 blocks each, 20 in the pool
        outputs = await asyncio.gather(*(tokens(scheduler.submit(r)) for r in requests))
    finally:
        scheduler.close()
    assert scheduler.stats.preempted > 0
    assert_alone_equal(serving_model, reference_engine, requests, outputs)
    assert scheduler.engine.cache.free_blocks == 20


async def test_admission_is_round_robin_across_adapters(serving_model):
    a, b = list(serving_model[1])[:2]
    scheduler = build(serving_model, max_running=1)
    order: list[str] = []

    async def run(label: str, adapter: str) -> None:
        await tokens(scheduler.submit(Request(AdapterReference(adapter), [1, 2, 3], SamplingParams(max_new_tokens=2))))
        order.append(label)

    tasks = [asyncio.create_task(run(label, adapter))
             for label, adapter in [("a1", a), ("a2", a), ("a3", a), ("b1", b), ("base1", "")]]
    await asyncio.sleep(0)  # every submit is queued before the loop starts
    scheduler.start()
    try:
        await asyncio.gather(*tasks)
    finally:
        scheduler.close()
    assert order == ["a1", "b1", "base1", "a2", "a3"]


async def test_full_waiting_queue_refuses_and_close_ends_queued_requests(serving_model):
    scheduler = build(serving_model, max_waiting=2)  # not started: everything stays queued
    request = Request(AdapterReference(""), [1, 2, 3], SamplingParams(max_new_tokens=4))
    queued = [scheduler.submit(request), scheduler.submit(request)]
    with pytest.raises(Overloaded, match="max_waiting=2"):
        scheduler.submit(request)
    scheduler.close()
    for stream in queued:
        with pytest.raises(ShuttingDown):
            await tokens(stream)
    with pytest.raises(ShuttingDown):
        scheduler.submit(request)


async def test_cancel_frees_kv_blocks_and_adapter_references(serving_model):
    adapter = next(iter(serving_model[1]))
    scheduler = build(serving_model, max_running=1)
    cache = scheduler.engine.cache
    scheduler.start()
    try:
        long = SamplingParams(max_new_tokens=200, ignore_eos=True)
        running = scheduler.submit(Request(AdapterReference(adapter), list(range(20)), long))
        waiting = scheduler.submit(Request(AdapterReference(adapter), list(range(20)), long))
        iterator = aiter(running)
        await anext(iterator)
        assert cache.free_blocks < cache.num_blocks and scheduler.num_waiting == 1
        waiting.cancel()
        assert await tokens(waiting) == []
        running.cancel()
        remaining = await tokens(iterator)
        assert len(remaining) < 199, "cancel should stop generation early"
        await wait_until(lambda: cache.free_blocks == cache.num_blocks)
        assert active_requests(scheduler.adapters, adapter) == 0
        assert scheduler.stats.cancelled == 2
    finally:
        scheduler.close()


async def test_an_unknown_adapter_is_refused_at_submit(serving_model):
    """(The prompt's and max_new_tokens' checks are the core's: test_request_validation.py.)"""
    scheduler = build(serving_model)
    with pytest.raises(AdapterNotFound, match="'nope'"):
        scheduler.submit(Request(AdapterReference("nope"), [1, 2], SamplingParams(max_new_tokens=4)))
    assert scheduler.num_waiting == 0
    scheduler.close()


async def test_distinct_adapters_per_step_are_capped(serving_model, reference_engine):
    scheduler = build(serving_model, max_running=8, max_step_adapters=2)
    assert build(serving_model).max_step_adapters == scheduler.engine.num_slots  # the default: device slots
    step, per_step = scheduler.engine.step, []

    def recording_step(batch):
        per_step.append({seq.slot for seq, _ in batch} - {NO_ADAPTER})
        return step(batch)

    scheduler.engine.step = recording_step
    requests = mixed_requests(serving_model, 10, max_new_tokens=6)  # the base and 4 adapters, 2 requests each
    scheduler.start()
    try:
        outputs = await asyncio.gather(*(tokens(scheduler.submit(r)) for r in requests))
    finally:
        scheduler.close()
    assert max(len(slots) for slots in per_step) == 2
    assert len(set().union(*per_step)) == 4
    assert_alone_equal(serving_model, reference_engine, requests, outputs)
