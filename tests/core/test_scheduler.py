"""Scheduler: continuous batching equals each request run alone; fairness, preemption, bounds, cancel; the prefix
cache at admission (exact outputs with it and without, shared blocks counted once, version safety)."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from loraplex.adapters.reference import AdapterReference
from loraplex.server.core.errors import AdapterNotFound, InvalidRequest, Overloaded, ShuttingDown
from loraplex.server.core.quota_config import QuotaSettings
from loraplex.server.core.requests import Request, RequestStream
from loraplex.server.core.scheduler import NO_QUOTAS, Scheduler
from loraplex.server.core.scheduler_config import SchedulerConfig
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import SamplingParams
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.model_files import model_spec
from serving_support import active_requests, adapter_manager, generate_alone, make_engine
from support import ARCHITECTURES, MIXED_ADAPTERS, write_adapter, write_tiny_model

#: KV bytes per block of the tiny llama (2 layers, 2 kv heads, head_dim 16, float32, block_size 4).
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4


def build(serving_model, engine_overrides=None, quotas: QuotaSettings = NO_QUOTAS, **config) -> Scheduler:
    base, adapters = serving_model
    engine = make_engine(base, **(engine_overrides or {}))
    store = Path(tempfile.mkdtemp(prefix="scheduler-store-"))
    return Scheduler(engine, adapter_manager(engine, adapters, store), SchedulerConfig(**config), quotas=quotas)


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


async def test_a_request_over_a_quota_is_refused_before_it_takes_a_lease_or_a_sequence(serving_model):
    adapter = next(iter(serving_model[1]))
    quotas = QuotaSettings.model_validate({"adapters": {adapter: {"max_queued": 1}}})
    scheduler = build(serving_model, quotas=quotas)  # not started: everything stays queued
    request = Request(AdapterReference(adapter), [1, 2, 3], SamplingParams(max_new_tokens=4), tenant="t")
    scheduler.submit(request)
    with pytest.raises(Overloaded, match=f"adapter '{adapter}' is over its max_queued of 1") as refused:
        scheduler.submit(request)
    assert refused.value.limit == "max_queued"
    assert active_requests(scheduler.adapters, adapter) == 1 and scheduler.num_waiting == 1  # no lease taken
    scheduler.submit(Request(AdapterReference(""), [1, 2, 3], SamplingParams(max_new_tokens=4), tenant="t"))
    tenants, _ = scheduler.quota_statuses()
    assert [(s.name, s.in_flight, s.queued) for s in tenants] == [("t", 2, 2)]
    scheduler.close()
    assert scheduler.tenant_status("t").in_flight == 0


async def test_an_unknown_adapter_is_refused_at_submit(serving_model):
    """(The prompt's and max_new_tokens' checks are the core's: test_request_validation.py.)"""
    scheduler = build(serving_model)
    with pytest.raises(AdapterNotFound, match="'nope'"):
        scheduler.submit(Request(AdapterReference("nope"), [1, 2], SamplingParams(max_new_tokens=4)))
    assert scheduler.num_waiting == 0
    scheduler.close()


@pytest.mark.parametrize(("fairness", "victim"), [(True, "heavy"), (False, "light")])
async def test_kv_pressure_preempts_the_tenant_most_over_its_share_first(serving_model, fairness, victim):
    scheduler = build(serving_model, engine_overrides=dict(kv_cache_bytes=8 * BLOCK_BYTES), max_running=2,
                      fairness=fairness)
    step, preempt, preempted = scheduler.engine.step, scheduler._preempt, []
    scheduler.engine.step = lambda batch, *pause: (time.sleep(0.01), step(batch, *pause))[1]  # light arrives meanwhile
    scheduler._preempt = lambda entry: (preempted.append(entry.tenant), preempt(entry))
    sampling = SamplingParams(max_new_tokens=16, ignore_eos=True)  # 24 positions: 6 of the 8 blocks each
    scheduler.start()
    try:
        heavy = aiter(scheduler.submit(Request(AdapterReference(""), list(range(1, 9)), sampling, tenant="heavy")))
        await anext(heavy)
        with scheduler._lock:
            scheduler._waiting.charge("heavy", 10_000)  # heavy was served far more than its share before
        light = scheduler.submit(Request(AdapterReference(""), list(range(11, 19)), sampling, tenant="light"))
        outputs = await asyncio.gather(tokens(light), tokens(heavy))
    finally:
        scheduler.close()
    assert preempted and preempted[0] == victim, preempted  # off: the newest running sequence, as before
    assert [len(output) for output in outputs] == [16, 15]


@pytest.mark.parametrize("case", ["two tenants", "one tenant", "fairness off"])
async def test_a_tenant_over_its_share_has_its_prompt_held_back_in_the_step_that_prefills_the_least_served_one(
        serving_model, reference_engine, case):
    """Heavy (far over its share) and light both decode; then both send a 30-token prompt. With fairness on, light's
    prompt goes whole into one step, where heavy's prompt gets only what light's leaves of over_share_prefill_tokens
    (36 - 30), and the rest of heavy's goes whole in the next step (light only decodes there); with heavy alone, or
    fairness off, heavy's goes whole at once. Outputs equal each request run alone either way."""
    scheduler = build(serving_model, max_running=8, max_step_tokens=64, over_share_prefill_tokens=36,
                      fairness=case != "fairness off")
    step, chunks, steps = scheduler.engine.step, {}, []  # seq_id -> token counts of its steps; each step's counts

    def recording_step(batch, between_layers=None):
        for seq, count in batch:
            chunks.setdefault(seq.seq_id, []).append(count)
        steps.append({seq.seq_id: count for seq, count in batch})
        return step(batch, between_layers)

    scheduler.engine.step = recording_step
    tenants = ["heavy"] if case == "one tenant" else ["heavy", "light"]
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    generator = torch.Generator().manual_seed(5)
    first = {t: Request(AdapterReference(""), torch.randint(0, 96, (4,), generator=generator).tolist(),
                        SamplingParams(max_new_tokens=40, ignore_eos=True), tenant=t) for t in tenants}
    second = {t: Request(AdapterReference(""), torch.randint(0, 96, (30,), generator=generator).tolist(), sampling,
                         tenant=t) for t in tenants}
    scheduler.start()
    try:
        running = {t: aiter(scheduler.submit(first[t])) for t in tenants}
        for stream in running.values():
            await anext(stream)  # both decoding
        with scheduler._lock:  # no plan in between: both wait, then heavy is charged far over its share
            streams = {t: scheduler.submit(second[t]) for t in tenants}
            seq_ids = {t: streams[t]._entry.seq.seq_id for t in tenants}
            scheduler._waiting.charge("heavy", 10_000)
            scheduler._owed = False  # the decode step in progress goes on unpaused: the next plan takes them
        outputs = await asyncio.gather(*(tokens(streams[t]) for t in tenants),
                                       *(tokens(stream) for stream in running.values()))
    finally:
        scheduler.close()
    prefill = {t: [c for c in chunks[seq_ids[t]] if c > 1] for t in tenants}
    if case == "two tenants":
        assert prefill == {"light": [30], "heavy": [6, 24]}, prefill
        light_step = next(counts for counts in steps if counts.get(seq_ids["light"]) == 30)
        assert light_step[seq_ids["heavy"]] == 6, "light's prefill takes the held-back budget first"
    else:
        assert all(prefill[t] == [30] for t in tenants), prefill
    for request, output in zip(second.values(), outputs, strict=False):
        assert output == generate_alone(reference_engine, serving_model[1], request.prompt_ids, "", request.sampling)


@pytest.mark.parametrize("fairness", [True, False])
async def test_a_prompt_of_another_tenant_pauses_a_prefill_step_between_layers_and_gets_its_first_token_first(
        serving_model, reference_engine, fairness):
    """Light's request arrives while heavy's prompt is in its prefill step. With fairness on, that step pauses after a
    layer while light's prompt runs whole in a step of its own, so light's first token comes before heavy's; with
    fairness off light waits for the step after. Both outputs equal each request run alone either way."""
    scheduler = build(serving_model, max_running=8, fairness=fairness)
    loop, step = asyncio.get_running_loop(), scheduler.engine.step
    generator = torch.Generator().manual_seed(9)
    heavy = Request(AdapterReference(""), torch.randint(0, 96, (60,), generator=generator).tolist(),
                    SamplingParams(max_new_tokens=6, ignore_eos=True), tenant="heavy")
    light = Request(AdapterReference("a_r4_qv"), torch.randint(0, 96, (9,), generator=generator).tolist(),
                    SamplingParams(max_new_tokens=6, ignore_eos=True), tenant="light")
    streams, submitted, nested, depth = {}, threading.Event(), [], [0]

    def submit_light() -> None:
        streams["light"] = scheduler.submit(light)
        submitted.set()

    def recording_step(batch, between_layers=None):
        ids = {seq.seq_id for seq, _ in batch}
        if depth[0]:
            nested.append(ids)
        if streams["heavy"]._entry.seq.seq_id in ids and not submitted.is_set():  # heavy's prefill: light arrives
            loop.call_soon_threadsafe(submit_light)
            assert submitted.wait(10)
        depth[0] += 1
        try:
            return step(batch, between_layers)
        finally:
            depth[0] -= 1

    scheduler.engine.step = recording_step
    streams["heavy"] = scheduler.submit(heavy)
    scheduler.start()

    async def timed_tokens(name: str) -> tuple[float, list[int]]:
        while name not in streams:
            await asyncio.sleep(0.001)
        stream = aiter(streams[name])
        first = [(await anext(stream)).token_id]
        arrived = time.monotonic()
        return arrived, first + await tokens(stream)

    try:
        (heavy_first, heavy_out), (light_first, light_out) = await asyncio.gather(timed_tokens("heavy"),
                                                                                  timed_tokens("light"))
    finally:
        scheduler.close()
    light_id = streams["light"]._entry.seq.seq_id
    if fairness:
        assert nested and nested[0] == {light_id}, nested  # light's prompt alone, inside heavy's prefill step
        assert light_first < heavy_first
    else:
        assert not nested and heavy_first < light_first
    assert heavy_out == generate_alone(reference_engine, serving_model[1], heavy.prompt_ids, "", heavy.sampling)
    assert light_out == generate_alone(reference_engine, serving_model[1], light.prompt_ids, "a_r4_qv",
                                       light.sampling)


async def test_a_less_served_tenants_request_pauses_a_decode_step_and_its_prompt_is_charged_once_computed(
        serving_model, reference_engine):
    """Heavy decodes; light's first request arrives during one of heavy's decode steps. Light has been served less,
    so that step pauses after a layer while light's prompt runs whole in a step of its own. Light's prompt is not
    charged to its share while that step computes it, and is charged once (9 prompt + 4 generated tokens in the
    end); both outputs equal each request run alone."""
    scheduler = build(serving_model, max_running=8, fairness=True)
    loop, step = asyncio.get_running_loop(), scheduler.engine.step
    generator = torch.Generator().manual_seed(11)
    heavy = Request(AdapterReference(""), torch.randint(0, 96, (8,), generator=generator).tolist(),
                    SamplingParams(max_new_tokens=12, ignore_eos=True), tenant="heavy")
    light = Request(AdapterReference("a_r4_qv"), torch.randint(0, 96, (9,), generator=generator).tolist(),
                    SamplingParams(max_new_tokens=4, ignore_eos=True), tenant="light")
    streams, submitted, nested, light_counter_then, depth = {}, threading.Event(), [], [], [0]

    def submit_light() -> None:
        streams["light"] = scheduler.submit(light)
        submitted.set()

    def recording_step(batch, between_layers=None):
        counts = {seq.seq_id: count for seq, count in batch}
        if depth[0]:
            nested.append(counts)
            light_counter_then.append(scheduler._waiting.counters.value("light"))
        heavy_seq = streams["heavy"]._entry.seq
        if counts == {heavy_seq.seq_id: 1} and heavy_seq.num_computed >= 11 and not submitted.is_set():
            loop.call_soon_threadsafe(submit_light)  # during heavy's fourth decode step
            assert submitted.wait(10)
        depth[0] += 1
        try:
            return step(batch, between_layers)
        finally:
            depth[0] -= 1

    scheduler.engine.step = recording_step
    streams["heavy"] = scheduler.submit(heavy)
    scheduler.start()
    try:
        heavy_out = await tokens(streams["heavy"])
        while "light" not in streams:
            await asyncio.sleep(0.001)
        light_out = await tokens(streams["light"])
    finally:
        scheduler.close()
    light_id = streams["light"]._entry.seq.seq_id
    assert nested[:1] == [{light_id: 9}], nested  # light's prompt alone, inside heavy's decode step
    assert light_counter_then[:1] == [0.0]  # not charged while its prompt is computed
    assert scheduler._waiting.counters.value("light") == 9 + 4
    assert scheduler._waiting.counters.value("heavy") == 8 + 12
    assert heavy_out == generate_alone(reference_engine, serving_model[1], heavy.prompt_ids, "", heavy.sampling)
    assert light_out == generate_alone(reference_engine, serving_model[1], light.prompt_ids, "a_r4_qv",
                                       light.sampling)


class DeadEndAfter:
    """A constraint allowing any token for `free` tokens, then none (a grammar the vocabulary cannot continue)."""

    def __init__(self, free: int) -> None:
        self.left = free

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = -1 if self.left > 0 else 0

    def advance(self, token_id: int) -> None:
        assert self.left > 0, "a token was taken where the constraint allows none"
        self.left -= 1

    @property
    def terminated(self) -> bool:
        return False


async def test_a_constraint_at_a_dead_end_fails_its_request_alone(serving_model, reference_engine):
    """Two tokens, then its constraint allows nothing: that request ends with InvalidRequest("constraint") after
    its two tokens, while the free requests in the same steps get their solo tokens."""
    scheduler = build(serving_model, max_running=4)
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    free = [Request(AdapterReference(name), [5, 6, 7, i], sampling) for i, name in enumerate(["", "a_r4_qv"])]
    stuck = Request(AdapterReference(""), [9, 8, 7], sampling, constraint=DeadEndAfter(2))
    scheduler.start()
    try:
        stuck_stream = scheduler.submit(stuck)
        outputs = await asyncio.gather(*(tokens(scheduler.submit(r)) for r in free))
        received = []
        with pytest.raises(InvalidRequest, match="constraint: the model's vocabulary cannot continue"):
            async for event in stuck_stream:
                received.append(event.token_id)
    finally:
        scheduler.close()
    assert len(received) == 2 and -1 not in received
    assert_alone_equal(serving_model, reference_engine, free, outputs)
    assert scheduler.engine.cache.free_blocks == scheduler.engine.cache.num_blocks


async def test_distinct_adapters_per_step_are_capped(serving_model, reference_engine):
    scheduler = build(serving_model, max_running=8, max_step_adapters=2)
    assert build(serving_model).max_step_adapters == scheduler.engine.num_slots  # the default: device slots
    step, per_step = scheduler.engine.step, []

    def recording_step(batch, between_layers=None):
        per_step.append({seq.slot for seq, _ in batch} - {NO_ADAPTER})
        return step(batch, between_layers)

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


# -- the prefix cache ----------------------------------------------------------------------------------

SYSTEM = list(range(40, 56))  # a 16-token "system prompt": 4 full blocks


def prefix_requests(names: list[str], max_new_tokens: int) -> list[Request]:
    """Per adapter name, three requests on SYSTEM (the same tokens for every name) with suffixes of their own,
    and one that shares nothing; interleaved across names."""
    generator = torch.Generator().manual_seed(9)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    requests = []
    for i in range(4):
        for name in names:
            suffix = torch.randint(0, 96, (3 + 2 * i,), generator=generator).tolist()
            prompt = suffix + SYSTEM if i == 3 else SYSTEM + suffix
            requests.append(Request(AdapterReference(name), prompt, sampling))
    return requests


@pytest.fixture(scope="module", params=[*ARCHITECTURES, pytest.param("smollm2", marks=pytest.mark.slow)])
def family_model(request, tmp_path_factory):
    """A tiny model of each family, and SmolLM2, with two of the MIXED_ADAPTERS."""
    root = tmp_path_factory.mktemp(f"prefix_{request.param}")
    base = default_model_path() if request.param == "smollm2" else write_tiny_model(request.param, root / "base")
    return base, {s.name: write_adapter(base, s, root / s.name, seed=20 + i) for i, s in enumerate(MIXED_ADAPTERS[:2])}


def build_with_lookups(model, kv_blocks: int, prefix_cache: bool, **config) -> tuple[Scheduler, list]:
    """A scheduler on `model` with a pool of `kv_blocks` blocks; the list collects its prefix lookups
    (adapter name, prompt tokens, cached tokens)."""
    base, adapters = model
    spec = model_spec(base)
    block_bytes = 2 * spec.num_layers * 4 * spec.num_kv_heads * spec.head_dim * 4  # float32, block_size 4
    engine = make_engine(base, kv_cache_bytes=kv_blocks * block_bytes, prefix_cache=prefix_cache)
    lookups: list[tuple[str, int, int]] = []
    manager = adapter_manager(engine, adapters, Path(tempfile.mkdtemp(prefix="scheduler-store-")))
    scheduler = Scheduler(engine, manager, SchedulerConfig(**config),
                          on_prefix=lambda *lookup: lookups.append(lookup))
    return scheduler, lookups


async def serve(scheduler: Scheduler, requests: list[Request]) -> list[list[int]]:
    scheduler.start()
    try:
        return await asyncio.gather(*(tokens(scheduler.submit(r)) for r in requests))
    finally:
        scheduler.close()


async def test_prefix_cache_keeps_outputs_exact_under_preemption(family_model):
    """Base rows and two adapters' rows, sharing a system prompt or not, in batches with chunked prefill and
    a pool small enough to preempt: greedy outputs with the cache equal those without, token for token."""
    requests = prefix_requests(["", *family_model[1]], max_new_tokens=10)
    outputs = {}
    for prefix_cache in (True, False):
        scheduler, lookups = build_with_lookups(family_model, kv_blocks=22, prefix_cache=prefix_cache, max_running=6,
                                                max_step_tokens=24)
        outputs[prefix_cache] = await serve(scheduler, requests)
        assert scheduler.stats.preempted > 0, "the pool is small enough to preempt"
        cache = scheduler.engine.cache
        assert cache.free_blocks == cache.num_blocks, "every block is released (cached ones stay reusable)"
        if prefix_cache:
            assert len(lookups) == len(requests) and sum(hit for _, _, hit in lookups) > 0
            assert all(hit % 4 == 0 and hit < prompt for _, prompt, hit in lookups)
            assert cache.cached_blocks > 0 and scheduler.prefix_cached_blocks() == cache.cached_blocks
        else:
            assert lookups == [] and cache.cached_blocks == 0
    assert outputs[True] == outputs[False]


async def test_shared_blocks_are_counted_once_at_admission(serving_model):
    """Three requests that each need 5 blocks alone, 4 of them one cached system prompt's, are admitted
    together into a pool of 12 (4 shared + 3 private blocks), not one by one."""
    scheduler, lookups = build_with_lookups(serving_model, kv_blocks=12, prefix_cache=True, max_running=4)
    engine, batches = scheduler.engine, []
    sampling = SamplingParams(max_new_tokens=2, ignore_eos=True)
    engine.generate([[*SYSTEM, 1]], sampling, versions=[""])  # before the loop starts: caches SYSTEM's 4 blocks
    step = engine.step

    def recording_step(batch, between_layers=None):
        batches.append([count for _, count in batch])
        return step(batch, between_layers)

    engine.step = recording_step
    readers = [Request(AdapterReference(""), [*SYSTEM, 2 + i], sampling) for i in range(3)]
    streams = [scheduler.submit(r) for r in readers]  # all waiting before the first plan
    scheduler.start()
    try:
        outputs = await asyncio.gather(*(tokens(s) for s in streams))
    finally:
        scheduler.close()
    assert [hit for _, _, hit in lookups] == [16, 16, 16]
    assert batches[0] == [1, 1, 1], "each prefills its one new token; 3 x 5 blocks would not fit 12"
    assert scheduler.stats.preempted == 0
    reference = make_engine(serving_model[0], prefix_cache=False)
    assert outputs == [reference.generate([r.prompt_ids], sampling)[0] for r in readers]


async def test_a_replaced_adapter_never_reuses_the_old_versions_blocks(serving_model, reference_engine, tmp_path):
    """"support" is replaced while requests on its first version run, after they cached the system prompt:
    the new version's requests find nothing cached (blocks are keyed by version digest, not by name; keyed
    by name they would reuse version 1's keys and values) and answer as that version alone. Another name
    on version 1's very files (one digest) does share its blocks."""
    base, adapters = serving_model
    engine = make_engine(base)
    roots = sorted({folder.parent for folder in adapters.values()})
    manager = adapter_manager(engine, {}, tmp_path / "store", allowed_roots=roots)
    old, new = "b_r16_all", "d_r8_k_gate"  # both change k_proj or v_proj: different keys and values
    manager.load(str(adapters[old]), "support")
    lookups: list[tuple[str, int, int]] = []
    scheduler = Scheduler(engine, manager, SchedulerConfig(max_running=8), on_prefix=lambda *hit: lookups.append(hit))
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [[*SYSTEM, 5 + i] for i in range(5)]

    def submit(name: str, prompt: list[int]) -> RequestStream:
        return scheduler.submit(Request(AdapterReference(name), prompt, sampling))

    scheduler.start()
    try:
        first = asyncio.gather(*(tokens(submit("support", p)) for p in prompts[:2]))
        await wait_until(lambda: engine.cache.cached_blocks >= 4)  # version 1 cached SYSTEM, still running
        await asyncio.to_thread(manager.load, str(adapters[new]), "support")
        second = [await tokens(submit("support", p)) for p in prompts[2:4]]  # one after the other
        await asyncio.to_thread(manager.load, str(adapters[old]), "alias")
        alias = await tokens(submit("alias", prompts[4]))
        first = await first
    finally:
        scheduler.close()
        manager.close()
    hits = [hit for _, _, hit in lookups]  # the first two: 0 and 0, or 0 and 16 (version 1's own blocks)
    assert hits[2:] == [0, 16, 16], "version 2 reuses only its own blocks; the alias of version 1, version 1's"
    for prompt, output in zip(prompts[:2], first, strict=True):
        assert output == generate_alone(reference_engine, adapters, prompt, old, sampling)
    for prompt, output in zip(prompts[2:4], second, strict=True):
        assert output == generate_alone(reference_engine, adapters, prompt, new, sampling)
    assert alias == generate_alone(reference_engine, adapters, prompts[4], old, sampling)
