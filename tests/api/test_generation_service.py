"""The gRPC server on loopback: batched streams equal each request run alone; every error status;
cancellation and deadlines give the KV blocks back; the prefix cache's cached_tokens and cache_salt."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from contextlib import asynccontextmanager
from importlib import metadata

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from loraplex.adapters.identity import adapter_digest
from loraplex.client.client import AsyncClient
from loraplex.client.records import FinishReason
from loraplex.server.app import start
from loraplex.server.core.auth import ApiKey
from loraplex.server.engine import EngineConfig, SamplingParams
from loraplex.server.settings import load_settings
from loraplex.v1 import generation_pb2 as pb
from serving_support import (
    TEST_ENGINE,
    TOKENIZER_CORPUS,
    active_requests,
    blocks_back,
    drain,
    expect_status,
    fail_next_step,
    generate_alone,
    make_engine,
    slow_steps,
)

KEYS = {"full": "k-full-0123456789", "support-only": "k-support-0123456789", "admin-only": "k-admin-0123456789",
        "admin-and-inference": "k-both-0123456789"}


@asynccontextmanager
async def running(serving_model, **overrides):
    base, adapters = serving_model
    values = dict(model=base, adapter=adapters, host="127.0.0.1", port=0, engine=EngineConfig(**TEST_ENGINE),
                  reflection=False)
    app = await start(load_settings(**{**values, **overrides}))
    try:
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            yield app, client
    finally:
        await app.stop(0)


@pytest.fixture(scope="module")
def reference_engine(serving_model):
    base, adapters = serving_model
    return make_engine(base, adapters)


async def test_concurrent_streams_equal_generate_alone(serving_model, reference_engine):
    _base, adapters = serving_model
    names = ["", *adapters]
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (4 + 5 * i,), generator=generator).tolist() for i in range(10)]
    async with running(serving_model, scheduler={"max_running": 4, "max_step_tokens": 24}) as (app, client):
        results = await asyncio.gather(*(
            client.generate(prompt, names[i % len(names)], max_new_tokens=10, ignore_eos=True,
                            **({"temperature": 0.8, "seed": i} if i % 2 else {}))
            for i, prompt in enumerate(prompts)))
        assert await blocks_back(app)
    for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        name = names[i % len(names)]
        sampling = SamplingParams(max_new_tokens=10, ignore_eos=True,
                                  **({"temperature": 0.8, "seed": i} if i % 2 else {}))
        assert result.token_ids == generate_alone(reference_engine, adapters, prompt, name, sampling), f"request {i}"
        completion = result.completion
        assert completion.finish_reason == FinishReason.LENGTH
        assert (completion.prompt_tokens, completion.generated_tokens) == (len(prompt), 10)
        assert completion.adapter == name
        assert completion.adapter_version == (adapter_digest(adapters[name]) if name else "")


async def test_text_input_streams_text_deltas(serving_model):
    base, _adapters = serving_model
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = TOKENIZER_CORPUS[-1]  # multi-byte characters spanning several byte-level tokens
    async with running(serving_model) as (_app, client):
        responses = [r async for r in client.generate_stream(prompt, "b_r16_all", max_new_tokens=40,
                                                             ignore_eos=True, temperature=1.0, seed=7)]
    token_ids = [r.token.id for r in responses]
    assert responses[-1].completion.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    assert "".join(r.text for r in responses) == text
    assert sum(bool(r.text) for r in responses) > 5


async def test_info_health_and_reflection(serving_model):
    _base, adapters = serving_model
    async with running(serving_model, reflection=True) as (_app, client):
        info = await client.server_info()
        health = health_pb2_grpc.HealthStub(client._channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="loraplex.v1.Generation"))
        reflection = reflection_pb2_grpc.ServerReflectionStub(client._channel)
        listing = [r async for r in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    services = {s.name for s in listing[0].list_services_response.service}
    assert {"loraplex.v1.Generation", "grpc.health.v1.Health"} <= services
    model = info.base_model
    assert (model.name, model.architecture, model.vocab_size, model.max_model_len) == ("base", "llama", 96, 256)
    assert (model.has_tokenizer, model.has_chat_template) == (True, False)
    assert (info.limits.adapter_slots, info.limits.max_adapter_rank) == (TEST_ENGINE["num_slots"], 64)
    assert (info.limits.max_new_tokens_limit, info.limits.default_max_new_tokens) == (4096, 256)
    assert info.versions.loraplex == metadata.version("loraplex")
    assert info.versions.libraries["torch"] == metadata.version("torch")
    assert {"transformers", "bitsandbytes", "grpcio", "protobuf"} <= set(info.versions.libraries)
    assert {(a.name, a.version) for a in info.adapters} == {(n, adapter_digest(f)) for n, f in adapters.items()}
    assert {a.name: a.rank for a in info.adapters}["c_r64_mlp_o_rslora"] == 64


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 500]}, "prompt"),
    ({"prompt": list(range(90)) * 3}, "prompt"),
    ({"prompt": [1, 2], "max_new_tokens": 5000}, "stopping.max_new_tokens"),
    ({"prompt": [1, 2], "stop_token_ids": [3, 96]}, "stopping.stop_token_ids"),
    ({"prompt": [1, 2], "top_p": 2.0}, "sampling.top_p"),
    ({"prompt": [1, 2], "temperature": -1.0}, "sampling.temperature"),
    ({"prompt": [1, 2], "chat": True}, "chat"),
    ({"prompt": ""}, "text"),
    ({"prompt": "hello", "chat": True}, "chat"),
    ({"prompt": [1, 2], "cache_salt": "s" * 257}, "cache_salt"),
])
async def test_invalid_arguments_name_the_field(serving_model, kwargs, field):
    async with running(serving_model) as (_app, client):
        details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.generate(**kwargs))
    assert details.startswith(f"{field}: "), details


async def test_missing_input_is_invalid(serving_model):
    async with running(serving_model) as (_app, client):
        stream = client._stub.GenerateStream(pb.GenerateRequest(adapter="a_r4_qv"))
        details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stream.read())
        unary = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, client._stub.Generate(pb.GenerateRequest()))
    assert details == unary == "input: set text or token_ids"


async def test_a_huge_adapter_reference_is_invalid_with_a_short_message(serving_model):
    async with running(serving_model) as (_app, client):
        name = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.generate([1, 2], "a" * 20000))
        version = await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                                      client.generate([1, 2], "a_r4_qv@" + "f" * 20000))
    assert name.startswith("adapter: adapter name 'aaaa") and "a" * 64 + "\u2026'" in name and len(name) < 300
    assert version.startswith("adapter: version 'ffff") and len(version) < 400


async def test_unknown_adapter_is_not_found(serving_model):
    async with running(serving_model) as (_app, client):
        details = await expect_status(grpc.StatusCode.NOT_FOUND, client.generate([1, 2], "missing"))
    assert "'missing'" in details


async def test_full_queue_is_resource_exhausted(serving_model):
    async with running(serving_model, scheduler={"max_running": 1, "max_waiting": 1}) as (app, client):
        slow_steps(app, 0.02)
        first = client.generate_stream([1, 2, 3], max_new_tokens=100, ignore_eos=True)
        await anext(first)  # running
        second = asyncio.create_task(client.generate([1, 2, 3], max_new_tokens=2))
        while app.scheduler.num_waiting < 1:
            await asyncio.sleep(0.005)
        details = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, client.generate([1, 2, 3]))
        assert "max_waiting=1" in details
        await first.aclose()
        assert len((await second).token_ids) == 2
        assert await blocks_back(app)


async def test_api_keys_scopes_and_adapter_allow_lists(serving_model):
    def key(name: str, **fields) -> ApiKey:
        return ApiKey(name=name, sha256=hashlib.sha256(KEYS[name].encode()).hexdigest(), **fields)

    keys = [key("full"), key("support-only", adapters=frozenset({"a_r4_qv"})),
            key("admin-only", scopes=frozenset({"admin"})),
            key("admin-and-inference", scopes=frozenset({"admin", "inference"}))]
    async with running(serving_model, api_keys=keys) as (app, _):
        target = f"127.0.0.1:{app.port}"
        clients = {name: AsyncClient(target, api_key=key) for name, key in KEYS.items()}
        anonymous, wrong = AsyncClient(target), AsyncClient(target, api_key="not-a-key")
        try:
            await expect_status(grpc.StatusCode.UNAUTHENTICATED, anonymous.generate([1, 2], max_new_tokens=1))
            await expect_status(grpc.StatusCode.UNAUTHENTICATED, wrong.server_info())
            assert len((await clients["full"].generate([1, 2], "b_r16_all", max_new_tokens=2)).token_ids) == 2
            assert len((await clients["support-only"].generate([1, 2], "a_r4_qv", max_new_tokens=2)).token_ids) == 2
            details = await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                          clients["support-only"].generate([1, 2], "b_r16_all", max_new_tokens=1))
            assert "'b_r16_all'" in details
            details = await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                          clients["support-only"].generate([1, 2], max_new_tokens=1))
            assert "base model" in details
            details = await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                          clients["support-only"].generate([1, 2], "b_r16_all@" + "0" * 64))
            assert "'b_r16_all'" in details
            for call in (clients["admin-only"].generate([1, 2], max_new_tokens=1),
                         anext(clients["admin-only"].generate_stream([1, 2], max_new_tokens=1)),
                         clients["admin-only"].server_info()):
                details = await expect_status(grpc.StatusCode.PERMISSION_DENIED, call)
                assert "API key 'admin-only' lacks the 'inference' scope" in details
            both = clients["admin-and-inference"]
            assert len((await both.generate([1, 2], "a_r4_qv", max_new_tokens=2)).token_ids) == 2
            assert len((await both.server_info()).adapters) == 4
        finally:
            for client in [*clients.values(), anonymous, wrong]:
                await client.close()


async def test_cached_tokens_and_cache_salt(serving_model, reference_engine):
    """A repeated prompt reports the tokens its prefix cache held (stream and unary, same tokens as without
    the cache); a salted request shares only with the same salt."""
    prompt = list(range(3, 20))  # 17 tokens: 4 blocks of 4 reusable
    options = dict(max_new_tokens=4, ignore_eos=True)
    async with running(serving_model) as (_app, client):
        first = await client.generate(prompt, "b_r16_all", **options)
        chunks = [chunk async for chunk in client.generate_stream(prompt, "b_r16_all", **options)]
        salted = [(await client.generate(prompt, "b_r16_all", cache_salt=salt, **options)).completion.cached_tokens
                  for salt in ("tenant-a", "tenant-a", "tenant-b")]
        other = await client.generate(prompt, "a_r4_qv", **options)
    assert first.completion.cached_tokens == 0 and first.completion.prompt_tokens == 17
    assert (chunks[0].prompt_tokens, chunks[0].cached_tokens) == (17, 16)
    assert chunks[-1].completion.cached_tokens == 16 and chunks[1].cached_tokens == 0
    expected = generate_alone(reference_engine, serving_model[1], prompt, "b_r16_all",
                              SamplingParams(**options))
    assert first.token_ids == [chunk.token.id for chunk in chunks] == expected
    assert salted == [0, 16, 0]
    assert other.completion.cached_tokens == 0, "another adapter never reuses these blocks"


async def test_client_cancel_frees_kv_blocks(serving_model):
    async with running(serving_model) as (app, client):
        slow_steps(app, 0.005)
        stream = client.generate_stream(list(range(30)), "d_r8_k_gate", max_new_tokens=200, ignore_eos=True)
        for _ in range(3):
            await anext(stream)
        assert app.scheduler.engine.cache.free_blocks < app.scheduler.engine.cache.num_blocks
        await stream.aclose()
        assert await blocks_back(app)
        assert app.scheduler.stats.cancelled == 1
        assert active_requests(app.scheduler.adapters, "d_r8_k_gate") == 0


@pytest.mark.parametrize("rpc", ["unary", "stream"])
async def test_deadline_exceeded_frees_kv_blocks(serving_model, rpc):
    async with running(serving_model) as (app, client):
        slow_steps(app, 0.01)
        call = client.generate if rpc == "unary" else lambda *a, **k: drain(client.generate_stream(*a, **k))
        await expect_status(grpc.StatusCode.DEADLINE_EXCEEDED,
                            call(list(range(30)), max_new_tokens=200, ignore_eos=True, timeout=0.3))
        assert await blocks_back(app)
        assert app.scheduler.stats.cancelled == 1


async def test_engine_failure_is_internal_and_the_server_keeps_serving(serving_model):
    async with running(serving_model) as (app, client):
        fail_next_step(app)
        details = await expect_status(grpc.StatusCode.INTERNAL, client.generate([1, 2, 3], max_new_tokens=3))
        assert "simulated" not in details
        assert len((await client.generate([1, 2, 3], max_new_tokens=3)).token_ids) == 3
        assert await blocks_back(app)


async def test_a_taken_port_fails_at_start(serving_model):
    async with running(serving_model) as (app, _client):
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{app.port}"):
            await start(load_settings(model=serving_model[0], port=app.port))


async def test_stop_token_ends_the_stream(serving_model):
    async with running(serving_model) as (_app, client):
        free = await client.generate([7, 8, 9], "a_r4_qv", max_new_tokens=12, ignore_eos=True)
        stop = free.token_ids[4]
        stopped = await client.generate([7, 8, 9], "a_r4_qv", max_new_tokens=12, ignore_eos=True,
                                        stop_token_ids=[stop])
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(stop) + 1]
    assert stopped.completion.finish_reason == FinishReason.STOP


async def test_unary_generate_equals_the_stream_and_logprobs_come_when_asked(serving_model):
    options = dict(max_new_tokens=9, ignore_eos=True, temperature=0.7, seed=3)
    no_prefix_cache = EngineConfig(**TEST_ENGINE, prefix_cache=False)  # a reused prefix moves logprobs' last bits
    async with running(serving_model, engine=no_prefix_cache) as (_app, client):
        unary = await client.generate("hello world", "b_r16_all", logprobs=True, **options)
        chunks = [c async for c in client.generate_stream("hello world", "b_r16_all", logprobs=True, **options)]
        plain = await client.generate("hello world", "b_r16_all", **options)
    assert unary.tokens == [c.token for c in chunks]
    assert unary.text == "".join(c.text for c in chunks) and unary.text
    assert unary.completion == chunks[-1].completion and all(c.completion is None for c in chunks[:-1])
    assert all(t.logprob is not None and t.logprob <= 0.0 for t in unary.tokens)
    assert plain.token_ids == unary.token_ids and all(t.logprob is None for t in plain.tokens)


async def test_adapter_references_by_name_version_and_prefix(serving_model):
    _base, adapters = serving_model
    digest = adapter_digest(adapters["a_r4_qv"])
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    async with running(serving_model) as (_app, client):
        by_name = await client.generate([3, 4, 5], "a_r4_qv", max_new_tokens=4, ignore_eos=True)
        for reference in (f"a_r4_qv@{digest}", f"a_r4_qv@{digest[:8]}", f"a_r4_qv@{digest[:12]}"):
            result = await client.generate([3, 4, 5], reference, max_new_tokens=4, ignore_eos=True)
            assert result.token_ids == by_name.token_ids
            assert (result.completion.adapter, result.completion.adapter_version) == ("a_r4_qv", digest)
        for reference in (f"a_r4_qv@{wrong}", f"a_r4_qv@{wrong[:8]}"):
            details = await expect_status(grpc.StatusCode.NOT_FOUND, client.generate([3, 4, 5], reference))
            assert details == f"adapter 'a_r4_qv' has no version {reference[8:]!r} (versions: {digest[:12]} (current))"
        details = await expect_status(grpc.StatusCode.NOT_FOUND, client.generate([3], f"missing@{digest}"))
        assert "no adapter named 'missing' is registered" in details
        malformed = ("a_r4_qv@", f"a_r4_qv@{digest[:7]}", "a_r4_qv@XYZ12345", f"a_r4_qv@{digest}0", "@abcd1234",
                     "bad name", "a@b@c")
        for reference in malformed:
            details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.generate([3], reference))
            assert details.startswith("adapter: "), details


async def test_malformed_protobuf_is_invalid_argument_logged_once(serving_model, caplog):
    async with running(serving_model) as (app, _client), grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        unary = channel.unary_unary("/loraplex.v1.Generation/Generate")  # bytes in, bytes out
        stream = channel.unary_stream("/loraplex.v1.Generation/GenerateStream")
        with caplog.at_level(logging.INFO):
            codes = []
            for garbage in (b"\xff\xff\xff", b"\x0a\xff", b"\x12\x05ab"):
                for call in (unary(garbage), stream(garbage).read()):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    codes.append((refused.value.code(), refused.value.details()))
        good = await channel.unary_unary("/loraplex.v1.Generation/Generate")(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]),
                               stopping=pb.StoppingCriteria(max_new_tokens=2)).SerializeToString())
    assert {code for code, _ in codes} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert codes[0][1] == "request: not a valid Generate request message (protobuf)"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "do not decode" in warnings[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    assert len(pb.GenerateResponse.FromString(good).tokens) == 2
