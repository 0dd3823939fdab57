"""Adapter tiers: the host LRU and the device slot table alone, then the manager with the scheduler:
just-in-time loads that do not block other requests, eviction that never touches a running adapter,
pinning, prefetch, version pruning; the watched drop folder."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest

from loraplex.adapters import loading
from loraplex.adapters.host_cache import HostCache
from loraplex.adapters.identity import adapter_digest
from loraplex.adapters.loading import LoadedAdapter
from loraplex.adapters.reference import AdapterReference
from loraplex.server.core.adapter_runtime import loader as loader_module
from loraplex.server.core.adapter_runtime.manager import AdapterManager
from loraplex.server.core.adapter_runtime.slots import DeviceSlots
from loraplex.server.core.adapter_runtime.watcher import AdapterWatcher
from loraplex.server.core.errors import FailedPrecondition
from loraplex.server.core.requests import Request
from loraplex.server.core.scheduler import Scheduler
from loraplex.server.core.scheduler_config import SchedulerConfig
from loraplex.server.engine import SamplingParams
from serving_support import adapter_manager, generate_alone, make_engine
from support import copy_with_config

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


def loaded(digest: str, nbytes: int) -> LoadedAdapter:
    return LoadedAdapter(digest, {}, nbytes, 0.0, 0.0)


def test_host_cache_keeps_the_most_recently_used_within_its_budget() -> None:
    cache = HostCache(budget_bytes=100)
    for digest in "abc":
        cache.put(loaded(digest, 40))
    assert ("a" in cache, "b" in cache, "c" in cache) == (False, True, True)
    assert (cache.bytes_used, cache.evictions) == (80, 1)
    cache.get("b")  # now the most recently used
    cache.put(loaded("d", 40))
    assert ("b" in cache, "c" in cache, "d" in cache) == (True, False, True)


def test_held_host_entries_are_never_evicted() -> None:
    cache = HostCache(budget_bytes=50)
    cache.put(loaded("a", 40), hold=True)
    cache.put(loaded("b", 40), hold=True)
    assert "a" in cache and "b" in cache and cache.bytes_used == 80  # over budget by held entries only
    cache.release_hold("a")
    cache.put(loaded("c", 5))
    assert "a" not in cache and "b" in cache and "c" in cache


def test_device_slot_victims_are_empty_first_then_least_recently_used_and_never_busy_or_pinned() -> None:
    slots = DeviceSlots(3)
    assert slots.victim(busy=(), pinned=()) == 0
    for slot, digest in enumerate("abc"):
        slots.assign(slot, digest)
    slots.find("a")  # used: b is now the least recently used
    assert slots.victim(busy=(), pinned=()) == 1
    assert slots.victim(busy={1}, pinned=()) == 2
    assert slots.victim(busy={1}, pinned={"c"}) == 0
    assert slots.victim(busy={0, 1}, pinned={"c"}) is None
    slots.evict(1)
    assert slots.evictions == 1 and not slots.holds("b") and slots.victim(busy=(), pinned=()) == 1


@pytest.fixture
def cold(serving_model, tmp_path: Path):
    """A function building (scheduler, manager) on a fresh engine whose adapters are registered but not loaded."""
    base, adapters = serving_model
    built: list[Scheduler] = []

    def build(num_slots: int = 4, extra_roots: tuple[Path, ...] = (), **settings) -> tuple[Scheduler, AdapterManager]:
        engine = make_engine(base, num_slots=num_slots)
        roots = sorted({folder.parent for folder in adapters.values()}) + list(extra_roots)
        manager = adapter_manager(engine, {}, tmp_path / f"store{len(built)}", allowed_roots=roots, **settings)
        for name, folder in adapters.items():
            manager.load(str(folder), name)
        scheduler = Scheduler(engine, manager, SchedulerConfig(max_running=8))
        scheduler.start()
        built.append(scheduler)
        return scheduler, manager

    yield build
    for scheduler in built:
        scheduler.close()
        scheduler.adapters.close()


@pytest.fixture(scope="module")
def reference_engine(serving_model):
    base, adapters = serving_model
    return make_engine(base, adapters)


async def collect(scheduler: Scheduler, adapter: str, prompt: list[int], sampling=GREEDY) -> list[int]:
    return [event.token_id async for event in scheduler.submit(Request(AdapterReference(adapter), prompt, sampling))]


def tier(manager: AdapterManager, name: str) -> str:
    return manager.status(name).versions[-1].tier


async def test_a_loading_adapter_does_not_hold_up_other_requests(cold, serving_model, reference_engine, monkeypatch):
    release = threading.Event()

    def blocked_load(*args, **kwargs):
        assert release.wait(30)
        return loading.load_version(*args, **kwargs)

    monkeypatch.setattr(loader_module, "load_version", blocked_load)
    scheduler, manager = cold()
    assert tier(manager, "a_r4_qv") == "store"
    cold_request = asyncio.ensure_future(collect(scheduler, "a_r4_qv", [1, 2, 3]))
    base_tokens = await asyncio.wait_for(collect(scheduler, "", [4, 5, 6]), 30)  # runs while "a" loads
    assert not cold_request.done() and scheduler.num_waiting == 1
    release.set()
    adapter_tokens = await asyncio.wait_for(cold_request, 30)
    _, adapters = serving_model
    assert base_tokens == generate_alone(reference_engine, adapters, [4, 5, 6], "", GREEDY)
    assert adapter_tokens == generate_alone(reference_engine, adapters, [1, 2, 3], "a_r4_qv", GREEDY)
    assert tier(manager, "a_r4_qv") == "device" and manager.stats.loads == 1


async def test_eviction_never_touches_an_adapter_in_use(cold, serving_model, reference_engine):
    """Two slots, four adapters: long requests keep their slots while short ones cycle through the other."""
    scheduler, manager = cold(num_slots=2)
    long = SamplingParams(max_new_tokens=40, ignore_eos=True)
    names = list(serving_model[1])
    requests = [(names[0], [7, 8, 9], long)] + [(names[1 + i % 3], [i + 1, i + 2], GREEDY) for i in range(9)]
    outputs = await asyncio.wait_for(asyncio.gather(*(collect(scheduler, *r) for r in requests)), 60)
    for (name, prompt, sampling), output in zip(requests, outputs, strict=True):
        assert output == generate_alone(reference_engine, serving_model[1], prompt, name, sampling), name
    assert manager.slots.evictions >= 2  # three adapters took turns in the one free slot (more if they interleaved)


async def test_a_pinned_adapter_stays_in_its_slot_and_one_slot_stays_unpinned(cold, serving_model):
    scheduler, manager = cold(num_slots=3)
    names = list(serving_model[1])
    manager.pin(names[0], True)
    await asyncio.wait_for(wait_for_tier(manager, names[0], "device"), 30)
    for round_ in range(2):
        for name in names[1:]:
            await collect(scheduler, name, [round_ + 1, 2])
            assert tier(manager, names[0]) == "device"
    manager.pin(names[1], True)
    with pytest.raises(FailedPrecondition, match=r"2 adapters are pinned and the server has 3 slots; one must stay"):
        manager.pin(names[2], True)
    assert manager.registry.entry(names[0]).pinned and not manager.registry.entry(names[2]).pinned


async def wait_for_tier(manager: AdapterManager, name: str, wanted: str) -> None:
    while tier(manager, name) != wanted:
        await asyncio.sleep(0.01)


async def test_prefetch_places_an_adapter_before_its_first_request(cold, serving_model):
    _scheduler, manager = cold()
    assert tier(manager, "b_r16_all") == "store"
    manager.prefetch("b_r16_all")
    await asyncio.wait_for(wait_for_tier(manager, "b_r16_all", "device"), 30)
    assert manager.stats.installs == 1


async def test_with_no_host_cache_loads_still_reach_their_slots(cold, serving_model, reference_engine):
    scheduler, manager = cold(num_slots=2, host_cache_bytes=0)
    names = list(serving_model[1])
    outputs = await asyncio.gather(*(collect(scheduler, name, [3, 4]) for name in names * 2))
    for name, output in zip(names * 2, outputs, strict=True):
        assert output == generate_alone(reference_engine, serving_model[1], [3, 4], name, GREEDY)
    assert manager.host.bytes_used == 0


def test_loading_more_than_max_versions_drops_the_oldest(cold, serving_model, tmp_path):
    sources = tmp_path / "versions"
    folders = [copy_with_config(serving_model[1]["a_r4_qv"], sources / f"v{i}", revision=f"v{i}") for i in range(3)]
    _scheduler, manager = cold(max_versions=2, extra_roots=(sources,))
    for folder in folders:
        manager.load(str(folder), "rolling")
    digests = [adapter_digest(folder) for folder in folders]
    assert manager.registry.entry("rolling").versions == tuple(digests[1:])
    assert manager.store.versions("rolling") == sorted(digests[1:])


def test_watched_folder_loads_new_and_changed_adapters_once_they_are_stable(cold, serving_model, tmp_path, caplog):
    drop = tmp_path / "drop"
    drop.mkdir()
    _scheduler, manager = cold(extra_roots=(drop,))
    watcher = AdapterWatcher(manager, drop, interval_s=3600)  # polled by hand below
    first = shutil.copytree(serving_model[1]["a_r4_qv"], drop / "support")
    assert watcher.poll() == []  # seen once: maybe still being copied
    assert watcher.poll() == ["support"] and watcher.poll() == []
    assert manager.registry.entry("support").current == adapter_digest(first)
    shutil.copy(serving_model[1]["d_r8_k_gate"] / "adapter_config.json", first / "adapter_config.json")
    shutil.copy(serving_model[1]["d_r8_k_gate"] / "adapter_model.safetensors", first / "adapter_model.safetensors")
    watcher.poll()
    assert watcher.poll() == ["support"]
    assert manager.registry.entry("support").versions[-1] == adapter_digest(serving_model[1]["d_r8_k_gate"])
    broken = copy_with_config(serving_model[1]["a_r4_qv"], drop / "broken", use_dora=True)
    watcher.poll()
    assert watcher.poll() == [] and watcher.poll() == []
    assert "watched adapter folder" in caplog.text and "DoRA" in caplog.text and caplog.text.count(str(broken)) == 1
