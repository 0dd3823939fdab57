"""Tenants on a real server (gRPC and HTTP on loopback): a tenant over its concurrency or token rate is refused
with RESOURCE_EXHAUSTED / 429 and a retry-after while another tenant's requests go through; an interactive
request is admitted before batch ones queued earlier; quotas reloaded live through TenantAdmin.ReloadQuotas
(a bad file refused, the old quotas kept); ServerInfo and ListTenants show limits and usage; the metrics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import grpc
import pytest

from loraplex.client.client import AsyncClient, ResourceExhausted
from loraplex.server.core.auth import ApiKey
from loraplex.v1 import tenants_pb2
from serving_support import expect_status, serving, slow_steps

SECRETS = {"a1": "secret-a1", "a2": "secret-a2", "b": "secret-b", "ops": "secret-ops"}
KEYS = [ApiKey(name=name, sha256=hashlib.sha256(secret.encode()).hexdigest(),
               scopes=frozenset({"inference", "admin"} if name == "ops" else {"inference"}))
        for name, secret in SECRETS.items()]
QUOTAS = """
[quotas.tenants.team-a]
keys = ["a1", "a2"]
max_concurrent = 2
[quotas.tenants.b]
weight = 2
"""


def quotas_file(folder: Path, text: str = QUOTAS) -> Path:
    path = folder / "quotas.toml"
    path.write_text(text)
    return path


def client(app, key: str) -> AsyncClient:
    return AsyncClient(f"127.0.0.1:{app.port}", api_key=SECRETS[key])


async def first_token(stream) -> None:
    await anext(stream)


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def http_post(url: str, payload: dict, key: str) -> tuple[int, dict, Message]:
    """(status, JSON answer, headers: case-insensitive) of a POST with `authorization: Bearer` the key's secret."""
    request = urllib.request.Request(url, method="POST", data=json.dumps(payload).encode(), headers={
        "content-type": "application/json", "authorization": f"Bearer {SECRETS[key]}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


async def test_a_tenant_over_its_concurrency_is_refused_while_another_goes_through(serving_model, tmp_path):
    async with serving(serving_model, api_keys=KEYS, quotas_file=quotas_file(tmp_path)) as (app, url):
        slow_steps(app, 0.02)
        a1, a2, b = client(app, "a1"), client(app, "a2"), client(app, "b")
        running = [a1.generate_stream([1, 2, 3], max_new_tokens=60, ignore_eos=True),
                   a2.generate_stream([4, 5, 6], "a_r4_qv", max_new_tokens=60, ignore_eos=True)]
        try:
            await asyncio.gather(*(first_token(stream) for stream in running))  # a1 and a2 are one tenant: 2
            with pytest.raises(ResourceExhausted) as refused:
                await a2.generate([7, 8], max_new_tokens=2)
            error = refused.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == "tenant 'team-a' is over its max_concurrent of 2 requests in flight"
            assert error.retry_after_s == 1 and ("retry-after", "1") in tuple(error.trailing_metadata())
            assert (await b.generate([7, 8], max_new_tokens=2)).completion.generated_tokens == 2  # b unaffected
            status, body, headers = await asyncio.to_thread(
                http_post, f"{url}/completions", {"model": "", "prompt": [1, 2], "max_tokens": 2}, "a1")
            assert status == 429 and headers["Retry-After"] == "1"
            assert body["error"]["type"] == "rate_limit_error" and "max_concurrent of 2" in body["error"]["message"]
            listing = await client(app, "ops").list_tenants()
            team = next(tenant for tenant in listing.tenants if tenant.name == "team-a")
            assert (team.in_flight, team.limits.max_concurrent) == (2, 2)
            info = await a1.server_info()
            assert info.tenant.name == "team-a" and info.tenant.in_flight == 2
        finally:
            for stream in running:
                await stream.aclose()
            for each in (a1, a2, b):
                await each.close()
            await wait_for(lambda: 'loraplex_tenant_queue_wait_seconds_count{tenant="team-a"} 2.0'
                           in app.metrics.exposition().decode())  # the two streams ended (cancelled)
        text = app.metrics.exposition().decode()
        assert 'loraplex_tenant_requests_refused_total{limit="max_concurrent",tenant="team-a"} 2.0' in text
        assert 'loraplex_tenant_requests_admitted_total{tenant="b"} 1.0' in text
        assert 'loraplex_tenant_served_tokens_total{tenant="b"} 4.0' in text


async def test_a_tenant_over_its_token_rate_gets_429_with_retry_after(serving_model, tmp_path):
    rate = QUOTAS.replace("max_concurrent = 2", "tokens_per_minute = 60\nburst_tokens = 20")  # 1/s, 20 at most
    async with serving(serving_model, api_keys=KEYS, quotas_file=quotas_file(tmp_path, rate)) as (app, url):
        body = {"model": "", "prompt": "hello world", "max_tokens": 19, "ignore_eos": True}
        status, answer, _ = await asyncio.to_thread(http_post, f"{url}/completions", body, "a1")
        assert status == 200, answer  # prompt + 19 generated: the bucket is in debt
        status, answer, headers = await asyncio.to_thread(http_post, f"{url}/completions", body, "a2")
        assert status == 429, answer
        assert int(headers["Retry-After"]) >= 1
        assert answer["error"]["message"].startswith("tenant 'team-a' is over its tokens_per_minute of 60")
        status, answer, _ = await asyncio.to_thread(http_post, f"{url}/completions", body, "b")
        assert status == 200, answer
        async with client(app, "a1") as a1:
            with pytest.raises(ResourceExhausted) as refused:
                await a1.generate("hello world", max_new_tokens=2)
            assert refused.value.retry_after_s >= 1 and "tokens_per_minute" in refused.value.details()


@pytest.mark.parametrize("batch_by", ["request", "adapter"])
async def test_an_interactive_request_is_admitted_before_batch_ones_queued_earlier(serving_model, tmp_path, batch_by):
    """Batch by the request's own priority, or by its adapter's class in the quotas (the request asks nothing)."""
    batch_adapter = '[quotas.adapters.d_r8_k_gate]\npriority = "batch"\nweight = 2\n'
    async with serving(serving_model, api_keys=KEYS, quotas_file=quotas_file(tmp_path, QUOTAS + batch_adapter),
                       scheduler={"max_running": 1}) as (app, _):
        slow_steps(app, 0.01)
        order: list[str] = []
        async with client(app, "b") as b, client(app, "a1") as a1:
            async def run(label: str, caller: AsyncClient, **options) -> None:
                await caller.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True, **options)
                order.append(label)

            blocker = asyncio.create_task(run("first", b, priority="interactive"))
            while not app.scheduler.queues().running:
                await asyncio.sleep(0.005)
            batch = {"priority": "batch"} if batch_by == "request" else {"adapter": "d_r8_k_gate"}
            tasks = [asyncio.create_task(run(f"batch{i}", b, **batch)) for i in range(3)]
            while app.scheduler.num_waiting < 3:
                await asyncio.sleep(0.005)
            tasks.append(asyncio.create_task(run("interactive", a1)))
            await asyncio.gather(blocker, *tasks)
        assert order[:2] == ["first", "interactive"], order
        async with client(app, "ops") as ops:
            adapter = next(a for a in (await ops.list_tenants()).adapters if a.name == "d_r8_k_gate")
        assert adapter.limits.weight == 2 and adapter.limits.priority == tenants_pb2.PRIORITY_BATCH


async def test_quotas_reload_live_and_a_bad_file_keeps_them(serving_model, tmp_path):
    path = quotas_file(tmp_path)
    async with serving(serving_model, api_keys=KEYS, quotas_file=path) as (app, _):
        slow_steps(app, 0.02)
        async with client(app, "a1") as a1, client(app, "ops") as ops, client(app, "b") as b:
            running = [a1.generate_stream([1, 2, 3], max_new_tokens=60, ignore_eos=True) for _ in range(2)]
            try:
                await asyncio.gather(*(first_token(stream) for stream in running))
                with pytest.raises(ResourceExhausted):
                    await a1.generate([4], max_new_tokens=1)
                path.write_text(QUOTAS.replace("max_concurrent = 2", "max_concurrent = 3"))
                reloaded = await ops.reload_quotas()
                team = next(tenant for tenant in reloaded.tenants if tenant.name == "team-a")
                assert team.limits.max_concurrent == 3 and team.in_flight == 2  # usage kept
                assert (await a1.generate([4], max_new_tokens=1)).completion.generated_tokens == 1
                path.write_text("[quotas.tenants.team-a]\nmax_concurrent = 0\n")
                details = await expect_status(grpc.StatusCode.FAILED_PRECONDITION, ops.reload_quotas())
                assert "previous ones stay in force" in details and "max_concurrent" in details
                listing = await ops.list_tenants()
                assert next(t for t in listing.tenants if t.name == "team-a").limits.max_concurrent == 3
                assert next(t for t in listing.tenants if t.name == "b").limits.weight == 2
                await expect_status(grpc.StatusCode.PERMISSION_DENIED, b.reload_quotas())  # needs "admin"
            finally:
                for stream in running:
                    await stream.aclose()


async def test_without_tenant_settings_every_caller_is_the_anonymous_tenant(serving_model):
    async with serving(serving_model) as (app, _), AsyncClient(f"127.0.0.1:{app.port}") as anonymous:
        await anonymous.generate([1, 2], max_new_tokens=3, ignore_eos=True, priority="batch")
        info = await anonymous.server_info()
        listing = await anonymous.list_tenants()
    assert info.tenant.name == "anonymous" and info.tenant.limits.weight == 1.0
    assert info.tenant.limits.priority == tenants_pb2.PRIORITY_INTERACTIVE
    assert [(t.name, t.in_flight, t.served_tokens) for t in listing.tenants] == [("anonymous", 0, 5)]
