"""Prometheus metrics, request ids and JSON logs on a real server: traffic for several adapters over gRPC and
HTTP, then /metrics scraped from the HTTP port and the separate metrics port and parsed with
prometheus-client's own text parser; counts match the requests sent, and the `_other` bucket holds the
adapters beyond max_adapter_labels; with API keys, /metrics on the HTTP port needs scope "metrics" or
"admin", and refused requests never give the name they sent a label."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import urllib.error
import urllib.request

import grpc
import openai
from prometheus_client.parser import text_string_to_metric_families

from loraplex.adapters.training_runs import record_run
from loraplex.client.client import AsyncClient, build_request
from loraplex.server.core.auth import ApiKey
from loraplex.server.logs import configure_logging
from loraplex.server.settings import AdapterSettings
from serving_support import post, serving, slow_steps, status_of

EXPORTED = {
    "counter": ["loraplex_requests", "loraplex_prompt_tokens", "loraplex_generation_tokens",
                "loraplex_adapter_evictions", "loraplex_adapter_cache_hits", "loraplex_adapter_cache_misses",
                "loraplex_training_runs", "loraplex_prefix_cache_queries", "loraplex_prefix_cache_hits",
                "loraplex_adapter_load_failures"],
    "histogram": ["loraplex_time_to_first_token_seconds", "loraplex_inter_token_latency_seconds",
                  "loraplex_e2e_request_latency_seconds", "loraplex_batch_size", "loraplex_step_duration_seconds",
                  "loraplex_adapter_load_seconds"],
    "gauge": ["loraplex_num_requests_running", "loraplex_num_requests_waiting", "loraplex_kv_cache_blocks_used",
              "loraplex_kv_cache_blocks_total", "loraplex_kv_cache_usage_perc", "loraplex_adapter_residency",
              "loraplex_lora_requests_info", "loraplex_prefix_cache_blocks"],
}


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """family name -> {(sample name, sorted labels): value}, parsed by prometheus-client."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
            | {("type", ()): family.type}
            for family in text_string_to_metric_families(text)}


def sample(families: dict, family: str, name: str, **labels: str) -> float:
    return families[family].get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_after_traffic_for_several_adapters(serving_model, tmp_path):
    store = tmp_path / "store"
    async with serving(serving_model, adapters=AdapterSettings(store=store),
                       metrics={"max_adapter_labels": 2, "port": 0}) as (app, url):
        before = await asyncio.to_thread(scrape, url.removesuffix("/v1") + "/metrics")  # assigns no label
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            for adapter in ("d_r8_k_gate", "d_r8_k_gate", "b_r16_all", "a_r4_qv", "c_r64_mlp_o_rslora", ""):
                await client.generate([1, 2, 3], adapter, max_new_tokens=4, ignore_eos=True)
            try:
                await client.generate([1, 2], "missing", max_new_tokens=2)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
            slow_steps(app, 0.01)
            stream = client.generate_stream([1, 2, 3], "b_r16_all", max_new_tokens=200, ignore_eos=True)
            await anext(stream)
            await stream.aclose()
        sdk = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        await sdk.completions.create(model="d_r8_k_gate", prompt=[1, 2, 3], max_tokens=3,
                                     extra_body={"ignore_eos": True})
        await sdk.close()
        record_run(store, "support", "succeeded")
        record_run(store, "support", "rejected")
        for _ in range(200):  # the cancelled stream is recorded once its generator closes
            if app.scheduler.stats.cancelled == 1:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        on_http = await asyncio.to_thread(scrape, url.removesuffix("/v1") + "/metrics")
        on_port = await asyncio.to_thread(scrape, f"http://127.0.0.1:{app.metrics_server.server_port}/metrics")
        blocks_total = app.scheduler.engine.cache.num_blocks
    assert set(on_port) == set(on_http)
    for kind, names in EXPORTED.items():
        for name in names:
            assert on_http[name][("type", ())] == kind, name
    requests = {dict(labels)["adapter"] + ":" + dict(labels)["outcome"]: value
                for (name, labels), value in on_http["loraplex_requests"].items() if name.endswith("_total") and value}
    assert sample(before, "loraplex_adapter_residency", "loraplex_adapter_residency", adapter="_other",
                  tier="store") == 4
    assert requests == {"d_r8_k_gate:length": 3, "b_r16_all:length": 1, "b_r16_all:cancelled": 1,
                        "_other:length": 2, "_unknown:refused": 1, "_base:length": 1}
    generated = {dict(labels)["adapter"]: value for (name, labels), value in
                 on_http["loraplex_generation_tokens"].items() if name.endswith("_total")}
    assert generated["d_r8_k_gate"] == 4 + 4 + 3 and generated["_other"] == 8 and generated["_base"] == 4
    assert generated["b_r16_all"] >= 5  # 4 + at least the one token of the cancelled stream
    assert sample(on_http, "loraplex_time_to_first_token_seconds", "loraplex_time_to_first_token_seconds_count",
                  adapter="d_r8_k_gate") == 3
    assert sample(on_http, "loraplex_inter_token_latency_seconds", "loraplex_inter_token_latency_seconds_count",
                  adapter="d_r8_k_gate") == 3 + 3 + 2
    assert sample(on_http, "loraplex_prompt_tokens", "loraplex_prompt_tokens_total", adapter="_base") == 3
    assert sample(on_http, "loraplex_kv_cache_blocks_total", "loraplex_kv_cache_blocks_total") == blocks_total
    assert sample(on_http, "loraplex_num_requests_running", "loraplex_num_requests_running") == 0
    assert sample(on_http, "loraplex_batch_size", "loraplex_batch_size_count") > 0
    assert sample(on_http, "loraplex_adapter_load_seconds", "loraplex_adapter_load_seconds_count", phase="read") >= 4
    assert sample(on_http, "loraplex_adapter_load_seconds", "loraplex_adapter_load_seconds_count", phase="copy") >= 4
    assert sample(on_http, "loraplex_adapter_residency", "loraplex_adapter_residency", adapter="d_r8_k_gate",
                  tier="store") == 1
    assert sample(on_http, "loraplex_adapter_residency", "loraplex_adapter_residency", adapter="_other",
                  tier="store") == 2
    assert sample(on_http, "loraplex_adapter_cache_hits", "loraplex_adapter_cache_hits_total", tier="device") >= 1
    assert {dict(labels)["outcome"]: value for (_, labels), value in on_http["loraplex_training_runs"].items()
            if labels} == {"succeeded": 1, "rejected": 1, "failed": 0, "interrupted": 0}
    (info_labels,) = [dict(labels) for (_, labels), _ in on_http["loraplex_lora_requests_info"].items() if labels]
    assert info_labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "4"}


async def test_lora_info_lists_running_and_waiting_adapters(serving_model, tmp_path):
    async with serving(serving_model, adapters=AdapterSettings(store=tmp_path / "store"),
                       scheduler={"max_running": 1}) as (app, url):
        slow_steps(app, 0.02)
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            first = client.generate_stream([1, 2, 3], "a_r4_qv", max_new_tokens=100, ignore_eos=True)
            await anext(first)
            second = asyncio.create_task(client.generate([1, 2, 3], "b_r16_all", max_new_tokens=2))
            while app.scheduler.num_waiting < 1:
                await asyncio.sleep(0.005)
            families = await asyncio.to_thread(scrape, url.removesuffix("/v1") + "/metrics")
            await first.aclose()
            await second
    (labels,) = [dict(labels) for (_, labels), _ in families["loraplex_lora_requests_info"].items() if labels]
    assert (labels["running_lora_adapters"], labels["waiting_lora_adapters"]) == ("a_r4_qv", "b_r16_all")
    assert sample(families, "loraplex_num_requests_waiting", "loraplex_num_requests_waiting") == 1
    assert sample(families, "loraplex_kv_cache_blocks_used", "loraplex_kv_cache_blocks_used") > 0


async def test_prefix_cache_queries_hits_and_cached_blocks(serving_model, tmp_path):
    """Prompt tokens looked up and found in the prefix cache, per adapter label, and the cached blocks."""
    prompt = list(range(1, 18))  # 17 tokens: 4 full blocks of 4 can be reused, the last token never
    async with serving(serving_model, adapters=AdapterSettings(store=tmp_path / "store")) as (app, url):
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            for adapter in ("a_r4_qv", "a_r4_qv", "", "b_r16_all"):
                await client.generate(prompt, adapter, max_new_tokens=2, ignore_eos=True)
        families = await asyncio.to_thread(scrape, url.removesuffix("/v1") + "/metrics")
        cached_blocks = app.scheduler.engine.cache.cached_blocks

    def counted(family: str) -> dict[str, float]:
        return {dict(labels)["adapter"]: value for (name, labels), value in families[family].items()
                if name.endswith("_total")}

    assert counted("loraplex_prefix_cache_queries") == {"a_r4_qv": 34, "_base": 17, "b_r16_all": 17}
    assert counted("loraplex_prefix_cache_hits") == {"a_r4_qv": 16, "_base": 0, "b_r16_all": 0}, \
        "only a second request on the same adapter version reuses its blocks"
    assert cached_blocks == 3 * 4
    assert sample(families, "loraplex_prefix_cache_blocks", "loraplex_prefix_cache_blocks") == cached_blocks


async def test_request_ids_reach_the_caller_and_every_log_line(serving_model, tmp_path, capsys):
    configure_logging("info", "json")
    try:
        async with serving(serving_model, adapters=AdapterSettings(store=tmp_path / "store"),
                           metrics={"enabled": False}) as (app, url):
            request = urllib.request.Request(f"{url}/completions", method="POST", data=json.dumps(
                {"model": "a_r4_qv", "prompt": "hello world", "max_tokens": 2}).encode(), headers={
                "content-type": "application/json", "x-request-id": "ticket-42"})
            headers = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).headers)
            made_up = await asyncio.to_thread(post, f"{url}/completions", {"model": "missing", "prompt": "hi"})
            async with AsyncClient(f"127.0.0.1:{app.port}") as client:
                call = client._stub.Generate(client_request(), metadata=(("x-request-id", "grpc-7"),))
                await call
                trailing = dict(await call.trailing_metadata())
            metrics_off = await asyncio.to_thread(status_of, url.removesuffix("/v1") + "/metrics")
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    by_id = {line.get("request_id"): line for line in lines if line["logger"] == "loraplex.requests"}
    assert headers["x-request-id"] == "ticket-42" and trailing["x-request-id"] == "grpc-7"
    assert by_id["ticket-42"]["adapter"] == "a_r4_qv" and by_id["ticket-42"]["outcome"] == "length"
    assert by_id["ticket-42"]["generated_tokens"] == 2 and "prompt" not in by_id["ticket-42"]
    assert by_id["grpc-7"]["outcome"] == "length"
    assert made_up[0] == 404 and any(line["outcome"] == "refused" for line in by_id.values())
    assert "hello world" not in err and metrics_off == 404


def client_request():
    return build_request([1, 2, 3], "a_r4_qv", max_new_tokens=2)


def scrape_status(url: str, key: str | None) -> tuple[int, str]:
    """(status, body) of GET url with `authorization: Bearer key` (None: no header)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_metrics_need_a_metrics_key_and_refusals_take_no_labels(serving_model):
    keys = {scope: f"key-{scope}-1234" for scope in ("inference", "metrics", "admin")}
    api_keys = [ApiKey(name=scope, sha256=hashlib.sha256(key.encode()).hexdigest(), scopes={scope})
                for scope, key in keys.items()]
    async with serving(serving_model, api_keys=api_keys, metrics={"max_adapter_labels": 2, "port": 0}) as (app, url):
        metrics_url = url.removesuffix("/v1") + "/metrics"
        statuses = {name: (await asyncio.to_thread(scrape_status, metrics_url, key))[0]
                    for name, key in {"none": None, "wrong": "nope", **keys}.items()}
        async with AsyncClient(f"127.0.0.1:{app.port}", api_key=keys["inference"]) as client, \
                AsyncClient(f"127.0.0.1:{app.port}", api_key="nope") as stranger:
            for i in range(30):  # made-up names, with a key and without one
                for caller in (client, stranger):
                    with contextlib.suppress(grpc.RpcError):
                        await caller.generate([1, 2], f"made-up-{i}", max_new_tokens=2)
            await client.generate([1, 2, 3], "a_r4_qv", max_new_tokens=2, ignore_eos=True)
            await client.generate([1, 2, 3], "b_r16_all", max_new_tokens=2, ignore_eos=True)
        _, text = await asyncio.to_thread(scrape_status, metrics_url, keys["metrics"])
        port_status, port_text = await asyncio.to_thread(
            scrape_status, f"http://127.0.0.1:{app.metrics_server.server_port}/metrics", None)
    assert statuses == {"none": 401, "wrong": 401, "inference": 403, "metrics": 200, "admin": 200}
    assert port_status == 200 and "loraplex_requests_total" in port_text  # the in-cluster scraper's port
    assert "made-up" not in text
    requests = {dict(s.labels)["adapter"] + ":" + dict(s.labels)["outcome"]: s.value
                for family in text_string_to_metric_families(text) if family.name == "loraplex_requests"
                for s in family.samples if s.name.endswith("_total") and s.value}
    assert requests == {"_unknown:refused": 30, "_refused:refused": 30, "a_r4_qv:length": 1, "b_r16_all:length": 1}
