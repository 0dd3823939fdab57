"""The OpenAI-style HTTP API on a real server (loopback), driven by the official `openai` SDK (sync and async,
unary and streamed, chat and completions, the models list, each error class, usage's cached prompt tokens and
cache_salt) and by raw HTTP for the SSE framing; the same request through HTTP and through gRPC gives the same
tokens."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import itertools
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import openai
import pytest

from loraplex.adapters.identity import adapter_digest
from loraplex.client.client import AsyncClient
from loraplex.server.app import start
from loraplex.server.core.auth import ApiKey
from loraplex.server.core.validation import MAX_CHARS_PER_POSITION
from loraplex.server.engine import EngineConfig
from loraplex.server.settings import AdapterSettings, load_settings
from serving_support import (
    TEST_ENGINE,
    TOKENIZER_CORPUS,
    blocks_back,
    fail_next_step,
    post,
    serving,
    slow_steps,
    status_of,
    with_chat_template,
)


def sdk(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


async def test_completions_and_chat_with_the_sync_and_async_sdk(serving_model):
    base_name = serving_model[0].name
    async with serving(serving_model) as (_app, url):
        client = sdk(url)
        models = await asyncio.to_thread(client.models.list)
        done = await asyncio.to_thread(client.completions.create, model="a_r4_qv", prompt=TOKENIZER_CORPUS[1],
                                       max_tokens=6, temperature=0)
        async_client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        streamed = await async_client.completions.create(model="a_r4_qv", prompt=TOKENIZER_CORPUS[1], max_tokens=6,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True})
        chunks = [chunk async for chunk in streamed]
        seeded = [await async_client.completions.create(model=base_name, prompt="hello world", max_tokens=8,
                                                        temperature=1.0, seed=11) for _ in range(2)]
        await async_client.close()
    ids = [model.id for model in models.data]
    assert ids == [base_name, *serving_model[1]]
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 6 and done.usage.total_tokens == done.usage.prompt_tokens + 6
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == done.choices[0].text and chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    assert seeded[0].choices[0].text == seeded[1].choices[0].text


async def test_chat_needs_a_chat_template_and_messages(serving_model):
    async with serving(serving_model) as (_app, url):
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])
        await client.close()
    assert error.value.status_code == 400 and error.value.body["param"] == "messages"
    assert "no chat template" in error.value.body["message"]


async def test_errors_have_openai_shape_and_status(serving_model):
    keys = [ApiKey(name="support", sha256=hashlib.sha256(b"k-support-1234").hexdigest(), adapters={"a_r4_qv"}),
            ApiKey(name="full", sha256=hashlib.sha256(b"k-full-1234").hexdigest())]
    async with serving(serving_model, api_keys=keys) as (_app, url):
        good = sdk(url, "k-support-1234")
        errors = {}
        for kind, call in {
            "unknown model": lambda: sdk(url, "k-full-1234").completions.create(model="missing", prompt="hi"),
            "bad type": lambda: good.completions.create(model="a_r4_qv", prompt="hi", max_tokens="many"),
            "out of range": lambda: good.completions.create(model="a_r4_qv", prompt="hi", max_tokens=10**9),
            "too many choices": lambda: good.completions.create(model="a_r4_qv", prompt="hi", n=100),
            "no key": lambda: sdk(url, "wrong").completions.create(model="a_r4_qv", prompt="hi"),
            "not allowed": lambda: good.completions.create(model="b_r16_all", prompt="hi"),
        }.items():
            with pytest.raises(openai.APIStatusError) as error:
                await asyncio.to_thread(call)
            errors[kind] = error.value
        listed = [model.id for model in (await asyncio.to_thread(good.models.list)).data]
    assert {kind: e.status_code for kind, e in errors.items()} == {
        "unknown model": 404, "bad type": 400, "out of range": 400, "too many choices": 400, "no key": 401,
        "not allowed": 403}
    assert errors["unknown model"].body["code"] == "model_not_found"
    assert (errors["bad type"].body["param"], errors["bad type"].body["type"]) == ("max_tokens",
                                                                                  "invalid_request_error")
    assert errors["too many choices"].body["param"] == "n" and "[1, 16]" in errors["too many choices"].body["message"]
    assert listed == ["a_r4_qv"]


async def test_a_schema_the_vocabulary_cannot_spell_is_refused_with_400(serving_model):
    """The tiny tokenizer has no way to write "Lisbon": 400 naming the constraint, and the server serves on."""
    schema = {"type": "object", "properties": {"city": {"enum": ["Lisbon", "Osaka"]}}, "required": ["city"]}
    async with serving(serving_model) as (_app, url):
        sdk = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.completions.create(model="", prompt="x", max_tokens=4, extra_body={"guided_json": schema})
        body = refused.value.body
        assert body["param"] == "guided_json" and "no token of the model's vocabulary can start" in body["message"]
        answer = await sdk.completions.create(model="", prompt="x", max_tokens=3)
        assert answer.usage.completion_tokens >= 1


async def test_sse_framing_and_stop_strings_over_raw_http(serving_model):
    async with serving(serving_model) as (_app, url):
        request = urllib.request.Request(f"{url}/completions", method="POST", headers={
            "content-type": "application/json"}, data=json.dumps({
                "model": "b_r16_all", "prompt": "hello world", "max_tokens": 12, "temperature": 0,
                "stream": True}).encode())
        raw = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).read().decode())
        full = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(urllib.request.Request(
            f"{url}/completions", method="POST", headers={"content-type": "application/json"}, data=json.dumps({
                "model": "b_r16_all", "prompt": "hello world", "max_tokens": 12, "temperature": 0}).encode()),
            timeout=30).read()))
        text = full["choices"][0]["text"]
        stop = text[3:5]
        stopped = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(urllib.request.Request(
            f"{url}/completions", method="POST", headers={"content-type": "application/json"}, data=json.dumps({
                "model": "b_r16_all", "prompt": "hello world", "max_tokens": 12, "temperature": 0,
                "stop": [stop]}).encode()), timeout=30).read()))
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    payloads = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-2]]
    assert all(frame.startswith("data: ") for frame in frames[:-1])
    assert "".join(p["choices"][0]["text"] for p in payloads) == text
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert stopped["choices"][0]["text"] == text[:text.find(stop)] and stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"] > 0


async def test_http_and_grpc_give_the_same_tokens(serving_model):
    async with serving(serving_model) as (app, url):
        async with AsyncClient(f"127.0.0.1:{app.port}") as grpc_client:
            by_grpc = await grpc_client.generate(TOKENIZER_CORPUS[1], "c_r64_mlp_o_rslora", max_new_tokens=10,
                                                 temperature=0.7, seed=5)
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        by_http = await client.completions.create(model="c_r64_mlp_o_rslora", prompt=TOKENIZER_CORPUS[1],
                                                  max_tokens=10, temperature=0.7, seed=5)
        await client.close()
    assert by_grpc.text and by_http.choices[0].text == by_grpc.text  # sampled with the same seed
    assert by_http.usage.completion_tokens == len(by_grpc.token_ids) == 10


async def test_a_client_that_disconnects_mid_stream_frees_its_sequence(serving_model):
    async with serving(serving_model) as (app, url):
        slow_steps(app, 0.01)
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        stream = await client.completions.create(model="a_r4_qv", prompt="hello world", max_tokens=400,
                                                 stream=True)
        await anext(aiter(stream))
        await stream.close()
        await client.close()
        assert await blocks_back(app)
        assert app.scheduler.stats.cancelled == 1


async def test_usage_reports_cached_prompt_tokens_and_cache_salt_keeps_tenants_apart(serving_model):
    """usage.prompt_tokens_details.cached_tokens (unary, streamed, with stop strings held back) counts the
    prompt tokens the prefix cache held; a request with a cache_salt shares only with the same salt."""
    prompt = list(range(3, 20))  # 17 tokens: 4 blocks of 4 reusable
    async with serving(serving_model) as (_app, url):
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)

        async def cached(**options) -> tuple[int, str]:
            extra = {"ignore_eos": True, **options.pop("extra_body", {})}
            done = await client.completions.create(model="d_r8_k_gate", prompt=prompt, max_tokens=3, temperature=0,
                                                   extra_body=extra, **options)
            return done.usage.prompt_tokens_details.cached_tokens, done.choices[0].text

        plain = [await cached(), await cached(), await cached(stop=["\u2603"])]
        salted = [await cached(extra_body={"cache_salt": salt}) for salt in ("t1", "t1", "t2")]
        streamed = await client.completions.create(model="d_r8_k_gate", prompt=prompt, max_tokens=3, temperature=0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True})
        chunks = [chunk async for chunk in streamed]
        await client.close()
    assert [hit for hit, _ in plain] == [0, 16, 16] and len({text for _, text in plain}) == 1
    assert [hit for hit, _ in salted] == [0, 16, 0]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 16 and chunks[-1].usage.prompt_tokens == 17


async def test_a_taken_http_port_fails_at_start(serving_model):
    async with serving(serving_model) as (app, _url):
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{app.http.port} \(HTTP\)"):
            await start(load_settings(model=serving_model[0], host="127.0.0.1", port=0, http_port=app.http.port,
                                      engine=EngineConfig(**TEST_ENGINE)))


async def test_vllm_style_load_and_unload_need_the_admin_scope(serving_model, tmp_path):
    folder = serving_model[1]["d_r8_k_gate"]
    keys = [ApiKey(name="admin", sha256=hashlib.sha256(b"k-admin-1234").hexdigest(), scopes={"admin", "inference"}),
            ApiKey(name="user", sha256=hashlib.sha256(b"k-user-1234").hexdigest())]
    async with serving(serving_model, adapter={}, api_keys=keys,
                       adapters=AdapterSettings(store=tmp_path / "store", allowed_roots=[folder.parent])) as (
            _app, url):
        refused = await asyncio.to_thread(post, f"{url}/load_lora_adapter",
                                          {"lora_name": "gate", "lora_path": str(folder)}, "k-user-1234")
        loaded = await asyncio.to_thread(post, f"{url}/load_lora_adapter",
                                         {"lora_name": "gate", "lora_path": str(folder)}, "k-admin-1234")
        client = sdk(url, "k-admin-1234")
        listed = [m.id for m in (await asyncio.to_thread(client.models.list)).data]
        answer = await asyncio.to_thread(client.completions.create, model="gate", prompt="hello", max_tokens=3)
        unloaded = await asyncio.to_thread(post, f"{url}/unload_lora_adapter", {"lora_name": "gate"}, "k-admin-1234")
        gone = await asyncio.to_thread(post, f"{url}/unload_lora_adapter", {"lora_name": "gate"}, "k-admin-1234")
        bad = await asyncio.to_thread(post, f"{url}/load_lora_adapter", {"lora_name": "x"}, "k-admin-1234")
    assert refused[0] == 403 and refused[1]["error"]["type"] == "permission_error"
    assert loaded == (200, {"lora_name": "gate", "version": adapter_digest(folder)})
    assert listed == [serving_model[0].name, "gate"] and answer.usage.completion_tokens == 3
    assert unloaded == (200, {"lora_name": "gate", "removed_versions": [adapter_digest(folder)]})
    assert gone[0] == 404 and bad[0] == 400 and bad[1]["error"]["param"] == "lora_path"


@pytest.fixture(scope="module")
def chat_model(serving_model, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return with_chat_template(serving_model, tmp_path_factory.mktemp("chat") / "base")


async def test_n_choices_sample_with_consecutive_seeds(serving_model):
    async with serving(serving_model) as (_app, url):
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        options = dict(model="b_r16_all", prompt="hello world", max_tokens=6, temperature=1.0, ignore_eos=True)
        many = await client.completions.create(n=3, seed=7, extra_body={"ignore_eos": True},
                                               **{k: v for k, v in options.items() if k != "ignore_eos"})
        alone = [await client.completions.create(seed=7 + i, extra_body={"ignore_eos": True},
                                                 **{k: v for k, v in options.items() if k != "ignore_eos"})
                 for i in range(3)]
        stream = await client.completions.create(n=2, seed=7, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True},
                                                 **{k: v for k, v in options.items() if k != "ignore_eos"})
        chunks = [chunk async for chunk in stream]
        await client.close()
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [a.choices[0].text for a in alone]
    assert len({c.text for c in many.choices}) > 1  # different seeds, different samples
    assert many.usage.completion_tokens == 18 and many.usage.prompt_tokens == alone[0].usage.prompt_tokens
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)]
    assert streamed == [c.text for c in many.choices[:2]] and chunks[-1].usage.completion_tokens == 12


async def test_logprobs_and_penalties_match_grpc(serving_model):
    options = dict(max_new_tokens=10, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5)
    # the same prompt three times: without the prefix cache each one is prefilled alone (a reused prefix computes the
    # last prompt token as a decode row, through the CPU decode-attention kernel: its logprob moves in the last bits)
    no_prefix_cache = EngineConfig(**TEST_ENGINE, prefix_cache=False)
    async with serving(serving_model, engine=no_prefix_cache) as (app, url):
        async with AsyncClient(f"127.0.0.1:{app.port}") as grpc_client:
            by_grpc = await grpc_client.generate(TOKENIZER_CORPUS[1], "a_r4_qv", logprobs=True, top_logprobs=3,
                                                 **options)
            plain = await grpc_client.generate(TOKENIZER_CORPUS[1], "a_r4_qv", max_new_tokens=10)
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        by_http = await client.completions.create(model="a_r4_qv", prompt=TOKENIZER_CORPUS[1], max_tokens=10,
                                                  temperature=0, frequency_penalty=1.5, presence_penalty=0.5,
                                                  logprobs=3)
        await client.close()
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # unpenalized greedy output repeats tokens ...
    assert len(set(by_grpc.token_ids)) > len(set(plain.token_ids))  # ... and the penalties reduce that
    choice = by_http.choices[0]
    assert choice.text == by_grpc.text
    logprobs = choice.logprobs
    assert logprobs.tokens == [t.piece for t in by_grpc.tokens]
    assert logprobs.token_logprobs == pytest.approx([t.logprob for t in by_grpc.tokens], rel=1e-6)
    for top, token in zip(logprobs.top_logprobs, by_grpc.tokens, strict=True):
        assert top == {alt.piece: pytest.approx(alt.logprob, rel=1e-6) for alt in reversed(token.top_logprobs)}
        assert len(token.top_logprobs) == 3
        assert [a.logprob for a in token.top_logprobs] == sorted((a.logprob for a in token.top_logprobs),
                                                                 reverse=True)
    texts = [t.text for t in by_grpc.tokens]
    assert logprobs.text_offset == [len("".join(texts[:i])) for i in range(len(texts))]


async def test_chat_with_messages_logprobs_and_streaming(chat_model):
    messages = [{"role": "system", "content": "hello world"}, {"role": "user", "content": "the quick brown fox"}]
    async with serving(chat_model) as (app, url):
        async with AsyncClient(f"127.0.0.1:{app.port}") as grpc_client:
            by_grpc = await grpc_client.generate(messages, "c_r64_mlp_o_rslora", max_new_tokens=8, logprobs=True,
                                                 top_logprobs=2)
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        answer = await client.chat.completions.create(model="c_r64_mlp_o_rslora", messages=messages, max_tokens=8,
                                                      temperature=0, logprobs=True, top_logprobs=2)
        stream = await client.chat.completions.create(model="c_r64_mlp_o_rslora", messages=messages, max_tokens=8,
                                                      temperature=0, stream=True)
        chunks = [chunk async for chunk in stream]
        refused = await asyncio.to_thread(post, f"{url}/chat/completions", {
            "model": "c_r64_mlp_o_rslora", "messages": messages, "top_logprobs": 2})
        await client.close()
    message = answer.choices[0].message
    assert message.role == "assistant" and message.content == by_grpc.text
    content = answer.choices[0].logprobs.content
    assert [entry.token for entry in content] == [t.piece for t in by_grpc.tokens]
    for entry, token in zip(content, by_grpc.tokens, strict=True):
        assert entry.logprob == pytest.approx(token.logprob, rel=1e-6) and entry.bytes == list(entry.token.encode())
        assert [alt.token for alt in entry.top_logprobs] == [alt.piece for alt in token.top_logprobs]
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, rel=1e-6)  # greedy takes the top one
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == by_grpc.text
    assert refused[0] == 400 and refused[1]["error"]["param"] == "top_logprobs"


async def test_overload_is_429_and_a_failed_step_is_500(serving_model):
    async with serving(serving_model, scheduler={"max_running": 1, "max_waiting": 1}) as (app, url):
        slow_steps(app, 0.02)
        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        running = await client.completions.create(model="a_r4_qv", prompt="hello", max_tokens=200, stream=True,
                                                  extra_body={"ignore_eos": True})
        await anext(aiter(running))
        waiting = asyncio.create_task(client.completions.create(model="a_r4_qv", prompt="hello", max_tokens=2))
        while app.scheduler.num_waiting < 1:
            await asyncio.sleep(0.005)
        with pytest.raises(openai.RateLimitError) as overloaded:
            await client.completions.create(model="a_r4_qv", prompt="hello", max_tokens=2)
        await running.close()
        await waiting
        fail_next_step(app)
        with pytest.raises(openai.InternalServerError) as failed:
            await client.completions.create(model="a_r4_qv", prompt="hello", max_tokens=2)
        after = await client.completions.create(model="a_r4_qv", prompt="hello", max_tokens=2)
        await client.close()
    assert overloaded.value.status_code == 429 and "max_waiting=1" in overloaded.value.body["message"]
    assert failed.value.status_code == 500 and failed.value.body["type"] == "server_error"
    assert "simulated" not in failed.value.body["message"]  # details stay in the server log
    assert after.usage.completion_tokens == 2  # the server goes on


class SlowTokenizer:
    """The server's tokenizer, taking `seconds` longer to tokenize (as a long prompt would)."""

    def __init__(self, tokenizer, seconds: float) -> None:
        self._tokenizer, self._seconds = tokenizer, seconds

    def __call__(self, *args, **kwargs):
        time.sleep(self._seconds)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def post_headers_only(port: int, declared_bytes: int) -> tuple[int, dict, float]:
    """POST /v1/completions declaring a `declared_bytes` body without sending it: (status, JSON, seconds)."""
    began = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("content-type", "application/json")
    connection.putheader("content-length", str(declared_bytes))
    connection.endheaders()
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return *answer, time.monotonic() - began


def timed_status(url: str) -> tuple[int, float]:
    began = time.monotonic()
    return status_of(url), time.monotonic() - began


async def test_no_prompt_delays_other_requests(serving_model):
    """While a gRPC stream runs: a 20 MB HTTP body is refused at once (413), a 20 MB gRPC message too
    (RESOURCE_EXHAUSTED), a prompt over the character limit is refused untokenized (400) and the longest
    allowed prompt is tokenized off the event loop (2 s here): the stream's largest gap stays under 1 s
    and /health answers within 1 s."""
    async with serving(serving_model) as (app, url):
        app.core.tokenizer = SlowTokenizer(app.core.tokenizer, 2.0)
        slow_steps(app, 0.01)
        longest = MAX_CHARS_PER_POSITION * app.scheduler.engine.max_model_len
        text = ("hello world " * longest)[:longest]
        port = app.http.port
        times: list[float] = []
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            async def stream() -> None:
                async for _ in client.generate_stream([1, 2, 3, 4], max_new_tokens=240, ignore_eos=True):
                    times.append(time.monotonic())

            streaming = asyncio.create_task(stream())
            while not times:
                await asyncio.sleep(0.005)
            tokenized = asyncio.create_task(asyncio.to_thread(post, f"{url}/completions", {"prompt": text}))
            await asyncio.sleep(0.2)  # the long prompt is being tokenized
            health, too_long, huge_http = await asyncio.gather(
                asyncio.to_thread(timed_status, f"{url.removesuffix('/v1')}/health"),
                asyncio.to_thread(post, f"{url}/completions", {"prompt": text + "x"}),
                asyncio.to_thread(post_headers_only, port, 20 * 2**20))
            with pytest.raises(grpc.aio.AioRpcError) as huge_grpc:
                await client.generate("x" * 20 * 2**20, max_new_tokens=1)
            allowed = await tokenized
            await streaming
    assert max(b - a for a, b in itertools.pairwise(times)) < 1.0
    assert health[0] == 200 and health[1] < 1.0
    assert huge_http[0] == 413 and huge_http[1]["error"]["type"] == "invalid_request_error" and huge_http[2] < 1.0
    assert huge_grpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert too_long[0] == 400 and too_long[1]["error"]["param"] == "prompt"
    assert "characters" in too_long[1]["error"]["message"]
    assert allowed[0] == 400 and "max_model_len" in allowed[1]["error"]["message"]  # tokenized: too many tokens


async def test_a_chunked_body_over_the_limit_is_refused_while_read(serving_model):
    async with serving(serving_model, http_max_body_bytes=4096) as (app, url):
        connection = http.client.HTTPConnection("127.0.0.1", app.http.port, timeout=10)
        body = json.dumps({"prompt": "x" * 5000}).encode()
        connection.request("POST", "/v1/completions", iter([body[:2000], body[2000:]]),
                           {"content-type": "application/json"}, encode_chunked=True)
        response = await asyncio.to_thread(connection.getresponse)
        status, answer = response.status, json.loads(response.read())
        connection.close()
        small = await asyncio.to_thread(post, f"{url}/completions", {"prompt": "hello", "max_tokens": 2})
    assert status == 413 and "4096" in answer["error"]["message"]
    assert small[0] == 200


def poison(app, first_token: int) -> None:
    """Make the engine report NaN log-probabilities from the third token on for sequences whose prompt starts
    with `first_token` (as a broken adapter would), test instrumentation like slow_steps."""
    step = app.scheduler.engine.step

    def poisoned_step(batch, between_layers=None):
        bad = {seq.seq_id for seq, _ in batch if seq.prompt_ids[0] == first_token and len(seq.output_ids) >= 2}
        return [replace(event, logprob=math.nan) if event.seq_id in bad else event
                for event in step(batch, between_layers)]

    app.scheduler.engine.step = poisoned_step


def raw_sse(port: int, body: dict) -> list[str]:
    """The data lines of a streamed completion over raw HTTP."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    lines = [line.decode().strip() for line in connection.getresponse()]
    connection.close()
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


async def test_non_finite_logprobs_fail_that_request_only(serving_model):
    async with serving(serving_model) as (app, url):
        poison(app, 90)
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            with pytest.raises(grpc.aio.AioRpcError) as by_grpc:
                await client.generate([90, 1, 2], max_new_tokens=4, ignore_eos=True)
            clean = await client.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True, logprobs=True)
        unary = await asyncio.to_thread(post, f"{url}/completions", {"prompt": [90, 1], "max_tokens": 4, "logprobs": 1})
        streamed = await asyncio.to_thread(raw_sse, app.http.port, {"prompt": [90, 1], "max_tokens": 4,
                                                                    "stream": True})
    assert by_grpc.value.code() == grpc.StatusCode.INTERNAL and "non-finite" in by_grpc.value.details()
    assert len(clean.token_ids) == 4 and all(math.isfinite(token.logprob) for token in clean.tokens)
    assert unary[0] == 500 and "non-finite" in unary[1]["error"]["message"]
    events = [json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in the stream"))
              for line in streamed]  # every event is strict JSON
    assert len(events) == 3 and events[0]["choices"] and events[1]["choices"]  # two tokens, then the failure
    assert "non-finite" in events[-1]["error"]["message"] and "[DONE]" not in streamed


@pytest.mark.parametrize(("body", "param"), [
    (b'{"prompt": "hi", "stop": 5}', "stop"),
    (b'{"prompt": "hi", "stop": {"a": 1}}', "stop"),
    (b'{"prompt": "hi", "stream_options": "x"}', "stream_options"),
    (b'{"prompt": "caf\xe9"}', "body"),  # Latin-1, not UTF-8
    (b'{"prompt": "x\\ud800y"}', "prompt"),  # a lone surrogate, escaped
    (b'{"messages": [{"role": "user", "content": "x\\udfff"}]}', "messages"),
    (b'{"\\ud800": 1, "prompt": "hi"}', "body"),
    (b'{"prompt": "hi", "cache_salt": 5}', "cache_salt"),
    (b'{"prompt": "hi", "cache_salt": "' + b"s" * 257 + b'"}', "cache_salt"),
    (b'{"prompt": "hi", "service_tier": "turbo"}', "service_tier"),
    (b'{"prompt": "hi", "service_tier": ["flex"]}', "service_tier"),
])
async def test_client_mistakes_are_400_naming_the_field(serving_model, body: bytes, param: str):
    async with serving(serving_model) as (_app, url):
        endpoint = "chat/completions" if b"messages" in body else "completions"
        request = urllib.request.Request(f"{url}/{endpoint}", data=body, method="POST",
                                         headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
        answer = json.loads(refused.value.read())
    assert refused.value.code == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"].startswith(f"{param}: ")
