"""Adapter lifecycle on a real server (gRPC on loopback): hot-swap under load, restart recovery, refused
uploads that leave the previous version serving, dry-run validation, unload while in use."""

from __future__ import annotations

import asyncio
import random
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from loraplex.adapters.identity import adapter_digest
from loraplex.adapters.peft_format import read_lora_weights
from loraplex.client.client import AsyncClient
from loraplex.server.app import start
from loraplex.server.engine import Engine, EngineConfig, SamplingParams
from loraplex.server.settings import AdapterSettings, load_settings
from loraplex.v1 import admin_pb2 as admin
from loraplex.v1 import admin_pb2_grpc as admin_grpc
from serving_support import TEST_ENGINE, expect_status, make_engine, post, slow_steps
from support import AdapterSpec, copy_with_config, write_adapter

#: Three versions of the "hot" adapter (different ranks and targets, so their outputs differ).
HOT_VERSIONS = (AdapterSpec("hot", 4, ("q_proj", "v_proj")), AdapterSpec("hot", 8, ("k_proj", "o_proj", "up_proj")),
                AdapterSpec("hot", 16, ("gate_proj", "down_proj", "q_proj")))


@pytest.fixture(scope="module")
def lifecycle(serving_model, tmp_path_factory):
    """(base, {folder name: adapter folder}): the serving adapters plus three versions of "hot", all under one
    allowed root."""
    base, adapters = serving_model
    root = tmp_path_factory.mktemp("sources")
    folders = {name: shutil.copytree(folder, root / name) for name, folder in adapters.items()}
    for i, spec in enumerate(HOT_VERSIONS):
        folders[f"hot_v{i}"] = write_adapter(base, spec, root / f"hot_v{i}", seed=100 + i, b_scale=1.0)
    return base, root, folders


@asynccontextmanager
async def serving(lifecycle, store: Path, **overrides):
    """A server with the sources' folder as allowed root, an AsyncClient and an AdapterAdmin stub."""
    base, root, _ = lifecycle
    values = dict(model=base, host="127.0.0.1", port=0, reflection=False,
                  engine=EngineConfig(**TEST_ENGINE), adapters=AdapterSettings(store=store, allowed_roots=[root]))
    app = await start(load_settings(**{**values, **overrides}))
    try:
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            yield app, client, admin_grpc.AdapterAdminStub(client._channel)
    finally:
        await app.stop(0)


def reference_outputs(base: Path, folders: dict[str, Path], prompts: list[list[int]],
                      max_new_tokens: int) -> dict[tuple[str, int], list[int]]:
    """(digest, prompt index) -> greedy tokens of that version run alone (each version in its own slot)."""
    engine: Engine = make_engine(base, num_slots=len(folders))
    expected = {}
    for slot, folder in enumerate(folders.values()):
        engine.set_slot(slot, read_lora_weights(folder))
        for i, prompt in enumerate(prompts):
            sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
            expected[(adapter_digest(folder), i)] = engine.generate([prompt], sampling, slots=[slot])[0]
    return expected


async def test_hot_swap_under_load_serves_every_request_from_the_version_it_names(lifecycle, tmp_path):
    base, _root, folders = lifecycle
    prompts = [torch.randint(0, 96, (3 + 4 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(6)]
    expected = reference_outputs(base, folders, prompts, max_new_tokens=8)
    hot = [folders[f"hot_v{i}"] for i in range(3)]
    served: list[tuple[str, str, int, list[int]]] = []  # (adapter, version, prompt index, tokens)
    failures: list[BaseException] = []
    async with serving(lifecycle, tmp_path / "store") as (app, client, stub):
        slow_steps(app, 0.002)  # keep requests in flight across swaps
        for name in ("hot", "a_r4_qv", "b_r16_all"):
            source = hot[0] if name == "hot" else folders[name]
            await stub.LoadAdapter(admin.LoadAdapterRequest(name=name, source=str(source)))
        swapping = True

        async def stream_worker(worker: int) -> None:
            names = ("hot", "hot", "a_r4_qv", "b_r16_all", "temp")
            rng = random.Random(worker)
            while swapping:
                name, i = names[rng.randrange(len(names))], rng.randrange(len(prompts))
                try:
                    chunks = [chunk async for chunk in client.generate_stream(prompts[i], name, max_new_tokens=8,
                                                                              ignore_eos=True)]
                except grpc.aio.AioRpcError as error:
                    if name == "temp" and error.code() == grpc.StatusCode.NOT_FOUND:
                        continue  # "temp" comes and goes; asking for it while unloaded is the caller's miss
                    failures.append(error)
                    continue
                completion = chunks[-1].completion
                served.append((completion.adapter, completion.adapter_version, i, [c.token.id for c in chunks]))

        workers = [asyncio.create_task(stream_worker(w)) for w in range(16)]
        await asyncio.sleep(0.3)
        for swap in range(10):
            response = await stub.LoadAdapter(admin.LoadAdapterRequest(name="hot", source=str(hot[(swap + 1) % 3])))
            assert response.changed and response.adapter.current_version == adapter_digest(hot[(swap + 1) % 3])
            await stub.LoadAdapter(admin.LoadAdapterRequest(name="temp", source=str(folders["d_r8_k_gate"])))
            await asyncio.sleep(0.15)
            await stub.UnloadAdapter(admin.UnloadAdapterRequest(name="temp", wait=True), timeout=30)
            await asyncio.sleep(0.1)
        swapping = False
        await asyncio.gather(*workers)
        listing = await stub.ListAdapters(admin.ListAdaptersRequest())
        stats, slot_evictions = app.scheduler.adapters.stats, app.scheduler.adapters.slots.evictions
    assert not failures, failures[:3]
    assert stats.loads >= 11 and slot_evictions > 0, "versions came and went through the tiers (4 slots)"
    by_version = {}
    for adapter, version, i, tokens in served:
        assert tokens == expected[(version, i)], f"{adapter}@{version[:12]} prompt {i} differs from it run alone"
        by_version.setdefault(adapter, set()).add(version)
    assert len(served) > 100
    assert by_version["hot"] == {adapter_digest(folder) for folder in hot}, "every hot version served requests"
    assert "temp" in by_version
    assert [status.name for status in listing.adapters] == ["a_r4_qv", "b_r16_all", "hot"]
    assert all(status.active_requests == 0 for status in listing.adapters)


async def test_registry_comes_back_identical_after_a_restart(lifecycle, tmp_path):
    _base, _root, folders = lifecycle
    store = tmp_path / "store"
    async with serving(lifecycle, store) as (_app, client, stub):
        for name, source in (("support", "hot_v0"), ("support", "hot_v1"), ("extract", "a_r4_qv"),
                             ("style", "c_r64_mlp_o_rslora")):
            await stub.LoadAdapter(admin.LoadAdapterRequest(name=name, source=str(folders[source])))
        await stub.PinAdapter(admin.PinAdapterRequest(name="extract", pinned=True))
        before = await stub.ListAdapters(admin.ListAdaptersRequest())
        first = await client.generate([5, 6, 7], "support", max_new_tokens=6, ignore_eos=True)
    async with serving(lifecycle, store) as (_app, client, stub):
        after = await stub.ListAdapters(admin.ListAdaptersRequest())
        again = await client.generate([5, 6, 7], "support", max_new_tokens=6, ignore_eos=True)
        old = await client.generate([5, 6, 7], f"support@{adapter_digest(folders['hot_v0'])[:10]}", max_new_tokens=2)

    def identity(listing: admin.ListAdaptersResponse) -> list:
        return [(s.name, s.current_version, s.pinned,
                 [(v.digest, v.rank, tuple(v.targets), v.size_bytes, v.dtype) for v in s.versions])
                for s in listing.adapters]

    assert identity(after) == identity(before)
    assert [s.name for s in after.adapters] == ["extract", "style", "support"]
    assert [len(s.versions) for s in after.adapters] == [1, 1, 2]
    assert after.adapters[0].pinned
    assert (again.token_ids, again.completion.adapter_version) == (first.token_ids, first.completion.adapter_version)
    assert old.completion.adapter_version == adapter_digest(folders["hot_v0"])


@pytest.mark.parametrize("damage", ["truncated", "corrupt header", "garbage"])
async def test_a_damaged_upload_is_refused_and_the_previous_version_keeps_serving(lifecycle, tmp_path, damage):
    _base, root, folders = lifecycle
    bad = copy_with_config(folders["hot_v1"], root / f"bad-{damage.replace(' ', '-')}")
    data = (folders["hot_v1"] / "adapter_model.safetensors").read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "corrupt header": b"\xff" * 16 + data[16:],
               "garbage": bytes(random.Random(1).randrange(256) for _ in range(500))}[damage]
    (bad / "adapter_model.safetensors").write_bytes(damaged)
    async with serving(lifecycle, tmp_path / "store") as (_app, client, stub):
        await stub.LoadAdapter(admin.LoadAdapterRequest(name="hot", source=str(folders["hot_v0"])))
        before = await client.generate([1, 2, 3], "hot", max_new_tokens=6, ignore_eos=True)
        details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                                      stub.LoadAdapter(admin.LoadAdapterRequest(name="hot", source=str(bad))))
        assert details.startswith("source: ") and "is corrupt or truncated" in details, details
        after = await client.generate([1, 2, 3], "hot", max_new_tokens=6, ignore_eos=True)
        status = await stub.DescribeAdapter(admin.DescribeAdapterRequest(name="hot"))
    assert after.completion.adapter_version == adapter_digest(folders["hot_v0"]) == status.current_version
    assert after.token_ids == before.token_ids
    assert len(status.versions) == 1
    assert sorted(p.name for p in (tmp_path / "store" / "hot").iterdir()) == [status.current_version]


def load_failures(app) -> float:
    """The server's loraplex_adapter_load_failures_total, read from its exposition."""
    (value,) = [sample.value for family in text_string_to_metric_families(app.metrics.exposition().decode())
                if family.name == "loraplex_adapter_load_failures" for sample in family.samples]
    return value


async def test_stored_files_damaged_on_disk_fail_their_requests_only(lifecycle, tmp_path):
    _base, _root, folders = lifecycle
    async with serving(lifecycle, tmp_path / "store") as (app, client, stub):
        loaded = await stub.LoadAdapter(admin.LoadAdapterRequest(name="hot", source=str(folders["hot_v2"])))
        stored = tmp_path / "store" / "hot" / loaded.adapter.current_version / "adapter_model.safetensors"
        stored.write_bytes(stored.read_bytes()[:-8])  # damaged after it was stored, before its first use
        details = await expect_status(grpc.StatusCode.FAILED_PRECONDITION, client.generate([1, 2], "hot"))
        assert "cannot be loaded" in details and "no longer match version" in details, details
        assert load_failures(app) == 1.0
        base_result = await client.generate([1, 2], "", max_new_tokens=3, ignore_eos=True)
        assert len(base_result.token_ids) == 3
        await stub.LoadAdapter(admin.LoadAdapterRequest(name="hot", source=str(folders["hot_v0"])))
        healed = await client.generate([1, 2], "hot", max_new_tokens=3, ignore_eos=True)
    assert healed.completion.adapter_version == adapter_digest(folders["hot_v0"])


async def test_validate_is_a_dry_run_and_says_what_to_change(lifecycle, tmp_path):
    _base, root, folders = lifecycle
    dora = copy_with_config(folders["a_r4_qv"], root / "dora", use_dora=True)
    async with serving(lifecycle, tmp_path / "store", engine=EngineConfig(**{**TEST_ENGINE, "max_rank": 8})) as (
            _app, _client, stub):
        good = await stub.ValidateAdapter(admin.ValidateAdapterRequest(source=str(folders["a_r4_qv"])))
        too_high = await stub.ValidateAdapter(admin.ValidateAdapterRequest(source=str(folders["b_r16_all"])))
        refused = await stub.ValidateAdapter(admin.ValidateAdapterRequest(source=str(dora)))
        outside = await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                                      stub.ValidateAdapter(admin.ValidateAdapterRequest(source=str(tmp_path))))
        listing = await stub.ListAdapters(admin.ListAdaptersRequest())
    assert good.valid and good.summary.digest == adapter_digest(folders["a_r4_qv"]) and good.summary.rank == 4
    assert list(good.summary.targets) == ["q_proj", "v_proj"] and good.summary.dtype == "float32"
    assert not too_high.valid and "rank 16 is above the server's max_rank 8" in too_high.problem
    assert not refused.valid and refused.problem == "DoRA adapters are not supported; train with use_dora=False"
    assert outside.startswith("source: ") and "outside the allowed adapter roots" in outside
    assert not listing.adapters
    assert not [p for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")], "a dry run stores nothing"


async def test_unload_refuses_or_waits_while_requests_use_the_adapter(lifecycle, tmp_path):
    _base, _root, folders = lifecycle
    async with serving(lifecycle, tmp_path / "store") as (app, client, stub):
        slow_steps(app, 0.01)
        await stub.LoadAdapter(admin.LoadAdapterRequest(name="hot", source=str(folders["hot_v0"])))
        stream = client.generate_stream([1, 2, 3], "hot", max_new_tokens=60, ignore_eos=True)
        await anext(stream)
        details = await expect_status(grpc.StatusCode.FAILED_PRECONDITION,
                                      stub.UnloadAdapter(admin.UnloadAdapterRequest(name="hot")))
        assert details == "adapter 'hot' is serving 1 request(s); retry when they finish, or unload with wait"
        assert (await stub.DescribeAdapter(admin.DescribeAdapterRequest(name="hot"))).active_requests == 1
        unload = asyncio.ensure_future(stub.UnloadAdapter(admin.UnloadAdapterRequest(name="hot", wait=True),
                                                          timeout=30))
        await asyncio.sleep(0.1)
        assert not unload.done()
        await expect_status(grpc.StatusCode.NOT_FOUND, client.generate([1], "hot"))  # gone for new requests
        rest = [chunk async for chunk in stream]  # the request in flight finishes on its version
        response = await unload
    assert len(rest) == 59 and rest[-1].completion.adapter_version == adapter_digest(folders["hot_v0"])
    assert response.drained and list(response.removed_versions) == [adapter_digest(folders["hot_v0"])]
    assert not (tmp_path / "store" / "hot").exists() or not any((tmp_path / "store" / "hot").iterdir())


async def test_admin_needs_the_admin_scope(lifecycle, tmp_path):
    import hashlib

    from loraplex.server.core.auth import ApiKey

    keys = [ApiKey(name="user", sha256=hashlib.sha256(b"user-key-0123").hexdigest(), scopes={"inference"})]
    async with serving(lifecycle, tmp_path / "store", api_keys=keys) as (_app, _client, stub):
        metadata = (("authorization", "Bearer user-key-0123"),)
        details = await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                      stub.ListAdapters(admin.ListAdaptersRequest(), metadata=metadata))
        await expect_status(grpc.StatusCode.UNAUTHENTICATED, stub.ListAdapters(admin.ListAdaptersRequest()))
    assert details == "API key 'user' lacks the 'admin' scope"


async def test_malformed_names_are_invalid_argument(lifecycle, tmp_path):
    async with serving(lifecycle, tmp_path / "store", http_port=0) as (app, _client, stub):
        details = [await expect_status(grpc.StatusCode.INVALID_ARGUMENT, call) for call in (
            stub.DescribeAdapter(admin.DescribeAdapterRequest(name="../../x")),
            stub.UnloadAdapter(admin.UnloadAdapterRequest(name="../../x")),
            stub.PinAdapter(admin.PinAdapterRequest(name="a" * 20000, pinned=True)))]
        missing = await expect_status(grpc.StatusCode.NOT_FOUND, stub.DescribeAdapter(
            admin.DescribeAdapterRequest(name="well-formed")))
        unload = await asyncio.to_thread(post, f"http://127.0.0.1:{app.http.port}/v1/unload_lora_adapter",
                                         {"lora_name": "../../x"})
    assert all(detail.startswith("name: adapter name '") for detail in details) and len(details[2]) < 300
    assert "'well-formed'" in missing
    assert unload[0] == 400 and unload[1]["error"]["param"] == "lora_name"
