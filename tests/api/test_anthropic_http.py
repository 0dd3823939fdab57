"""Anthropic's Messages API (POST /v1/messages) on a real server (loopback), driven by the official `anthropic`
SDK: unary and streamed replies on the base and on an adapter give the tokens the OpenAI chat route (openai
SDK) and gRPC give with the same sampling (greedy, seeded, top_k); stop sequences; the event sequence; each
refusal in Anthropic's error shape with its status (the SDK's typed errors), overload (429, Retry-After) and
a failed step (500) included; x-api-key and Bearer keys; a client that leaves a stream; the same answers
through `loraplex http-shim`; tool use on SmolLM2 matching the OpenAI route's tool calls."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import jsonschema
import openai
import pytest

from loraplex.client.client import AsyncClient
from loraplex.server.core.auth import ApiKey
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import EngineConfig
from serving_support import (
    TOKENIZER_CORPUS,
    blocks_back,
    fail_next_step,
    post,
    serving,
    slow_steps,
    start_translator,
    with_chat_template,
)

SYSTEM = "hello world"
ASK = [{"role": "user", "content": TOKENIZER_CORPUS[1]}]
ADAPTER = "c_r64_mlp_o_rslora"


@pytest.fixture(scope="module")
def chat_model(serving_model, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return with_chat_template(serving_model, tmp_path_factory.mktemp("anthropic-chat") / "base")


def clients(url: str, key: str = "none") -> tuple[anthropic.AsyncAnthropic, openai.AsyncOpenAI]:
    """The anthropic SDK (its base URL is the server's root) and the openai SDK, on one server."""
    return (anthropic.AsyncAnthropic(base_url=url.removesuffix("/v1"), api_key=key, max_retries=0),
            openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0))


def text_of(message) -> str:
    assert [block.type for block in message.content] == ["text"]
    return message.content[0].text


async def test_unary_and_streamed_messages_match_the_openai_chat_route(chat_model):
    base = chat_model[0].name
    sampled = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=1.0, top_p=0.9, seed=11)}
    async with serving(chat_model) as (_app, url):
        claude, gpt = clients(url)
        for model in (base, ADAPTER):
            for kind, options in sampled.items():
                expected = await gpt.chat.completions.create(
                    model=model, messages=[{"role": "system", "content": SYSTEM}, *ASK], max_tokens=10, **options)
                unary = await claude.messages.create(model=model, system=SYSTEM, messages=ASK, max_tokens=10,
                                                     extra_body=options)
                events = [event async for event in await claude.messages.create(
                    model=model, system=[{"type": "text", "text": SYSTEM}], messages=ASK, max_tokens=10,
                    stream=True, extra_body=options)]
                async with claude.messages.stream(model=model, system=SYSTEM, messages=ASK, max_tokens=10,
                                                  extra_body=options) as stream:
                    accumulated = await stream.get_final_message()
                choice = expected.choices[0]
                assert text_of(unary) == choice.message.content, (model, kind)
                assert unary.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[choice.finish_reason]
                assert unary.stop_sequence is None and unary.role == "assistant" and unary.model == model
                assert unary.usage.output_tokens == expected.usage.completion_tokens
                assert unary.usage.input_tokens + unary.usage.cache_read_input_tokens == expected.usage.prompt_tokens
                assert unary.model_extra["adapter_version"] == expected.model_extra["adapter_version"]
                types = [event.type for event in events]
                deltas = types.count("content_block_delta")
                assert types == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                                 "content_block_stop", "message_delta", "message_stop"]
                assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == text_of(unary)
                assert events[0].message.usage.input_tokens + events[0].message.usage.cache_read_input_tokens \
                    == expected.usage.prompt_tokens
                assert events[-2].delta.stop_reason == unary.stop_reason
                assert events[-2].usage.output_tokens == unary.usage.output_tokens
                assert text_of(accumulated) == text_of(unary) and accumulated.stop_reason == unary.stop_reason
        await claude.close()
        await gpt.close()


async def test_top_k_samples_as_grpc_does(chat_model):
    messages = [{"role": "system", "content": SYSTEM}, *ASK]
    async with serving(chat_model) as (app, url):
        async with AsyncClient(f"127.0.0.1:{app.port}") as grpc_client:
            expected = await grpc_client.generate(messages, ADAPTER, max_new_tokens=10, temperature=1.0, top_k=3,
                                                  seed=5)
        claude, _ = clients(url)
        answer = await claude.messages.create(model=ADAPTER, system=SYSTEM, messages=ASK, max_tokens=10,
                                              extra_body={"temperature": 1.0, "top_k": 3, "seed": 5})
        await claude.close()
    assert text_of(answer) == expected.text and answer.usage.output_tokens == len(expected.token_ids)


async def test_a_stop_sequence_ends_the_reply_where_the_openai_route_stops(chat_model):
    async with serving(chat_model) as (_app, url):
        claude, gpt = clients(url)
        greedy = {"temperature": 0}
        full = text_of(await claude.messages.create(model=ADAPTER, messages=ASK, max_tokens=16, extra_body=greedy))
        stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if full[i:i + 2].strip())
        cut = await claude.messages.create(model=ADAPTER, messages=ASK, max_tokens=16, extra_body=greedy,
                                           stop_sequences=["never-generated", stop])
        events = [event async for event in await claude.messages.create(
            model=ADAPTER, messages=ASK, max_tokens=16, extra_body=greedy, stop_sequences=[stop], stream=True)]
        expected = await gpt.chat.completions.create(model=ADAPTER, messages=ASK, max_tokens=16, temperature=0,
                                                     stop=[stop])
        await claude.close()
        await gpt.close()
    assert text_of(cut) == full[:full.find(stop)] == expected.choices[0].message.content
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == text_of(cut)
    assert (events[-2].delta.stop_reason, events[-2].delta.stop_sequence) == ("stop_sequence", stop)


async def test_a_client_that_leaves_a_stream_frees_its_sequence(chat_model):
    async with serving(chat_model) as (app, url):
        slow_steps(app, 0.01)
        claude, _ = clients(url)
        stream = await claude.messages.create(model=ADAPTER, messages=ASK, max_tokens=200, stream=True)
        assert (await anext(aiter(stream))).type == "message_start"
        await stream.close()
        await claude.close()
        assert await blocks_back(app)
        assert app.scheduler.stats.cancelled == 1


async def test_overload_is_429_with_retry_after_and_a_failed_step_is_500(chat_model):
    async with serving(chat_model, scheduler={"max_running": 1, "max_waiting": 1}) as (app, url):
        slow_steps(app, 0.02)
        claude, _ = clients(url)
        running = await claude.messages.create(model=ADAPTER, messages=ASK, max_tokens=200, stream=True)
        await anext(aiter(running))
        waiting = asyncio.create_task(claude.messages.create(model=ADAPTER, messages=ASK, max_tokens=2))
        while app.scheduler.num_waiting < 1:
            await asyncio.sleep(0.005)
        with pytest.raises(anthropic.RateLimitError) as overloaded:
            await claude.messages.create(model=ADAPTER, messages=ASK, max_tokens=2)
        await running.close()
        await waiting
        fail_next_step(app)
        with pytest.raises(anthropic.InternalServerError) as failed:
            await claude.messages.create(model=ADAPTER, messages=ASK, max_tokens=2)
        await claude.close()
    assert (overloaded.value.status_code, overloaded.value.type) == (429, "rate_limit_error")
    assert "max_waiting=1" in overloaded.value.api_message and overloaded.value.response.headers["retry-after"]
    assert (failed.value.status_code, failed.value.type) == (500, "api_error")
    assert "simulated" not in failed.value.api_message  # details stay in the server log


async def test_messages_through_the_http_shim_alone(chat_model):
    """`loraplex http-shim` in front of the server's gRPC port answers Messages as the embedded shim does; the
    x-api-key goes through to the server, which checks it."""
    key = "k-full-1234"
    keys = [ApiKey(name="full", sha256=hashlib.sha256(key.encode()).hexdigest())]
    async with serving(chat_model, api_keys=keys) as (app, url):
        process, shim_url = await asyncio.to_thread(start_translator, app.port)
        try:
            embedded, _ = clients(url, key)
            remote, _ = clients(shim_url, key)
            stranger, _ = clients(shim_url, "k-wrong-1234")
            request = dict(model=ADAPTER, system=SYSTEM, messages=ASK, max_tokens=8, stop_sequences=["zz"],
                           extra_body={"temperature": 0})
            here = await embedded.messages.create(**request)
            async with remote.messages.stream(**request) as stream:
                there = await stream.get_final_message()
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await stranger.messages.create(**request)
            for client in (embedded, remote, stranger):
                await client.close()
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait, 30)
    assert text_of(there) == text_of(here) and there.usage.output_tokens == here.usage.output_tokens
    assert refused.value.type == "authentication_error"


async def test_refusals_have_anthropic_shape_and_status(chat_model):
    keys = [ApiKey(name="support", sha256=hashlib.sha256(b"k-support-1234").hexdigest(), adapters={ADAPTER}),
            ApiKey(name="full", sha256=hashlib.sha256(b"k-full-1234").hexdigest())]
    async with serving(chat_model, api_keys=keys) as (_app, url):
        root = url.removesuffix("/v1")
        support, _ = clients(url, "k-support-1234")
        full, _ = clients(url, "k-full-1234")
        wrong, _ = clients(url, "k-wrong-1234")
        bearer = anthropic.AsyncAnthropic(base_url=root, auth_token="k-support-1234", max_retries=0)
        ask = dict(messages=ASK, max_tokens=4)
        served = [await support.messages.create(model=ADAPTER, **ask), await bearer.messages.create(model=ADAPTER,
                                                                                                   **ask)]
        refusals = {
            "no key": (anthropic.AuthenticationError, lambda: wrong.messages.create(model=ADAPTER, **ask)),
            "not allowed": (anthropic.PermissionDeniedError,
                            lambda: support.messages.create(model="b_r16_all", **ask)),
            "unknown model": (anthropic.NotFoundError, lambda: full.messages.create(model="missing", **ask)),
            "bad type": (anthropic.BadRequestError, lambda: full.messages.create(
                model=ADAPTER, extra_body={"max_tokens": "many"}, **ask)),
            "over the limit": (anthropic.BadRequestError, lambda: full.messages.create(  # past the SDK's own check
                model=ADAPTER, extra_body={"max_tokens": 10**9}, **ask)),
            "bad top_k": (anthropic.BadRequestError, lambda: full.messages.create(
                model=ADAPTER, extra_body={"top_k": -2}, **ask)),
            "image": (anthropic.BadRequestError, lambda: full.messages.create(model=ADAPTER, max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}])),
            "prefill": (anthropic.BadRequestError, lambda: full.messages.create(model=ADAPTER, max_tokens=4, messages=[
                *ASK, {"role": "assistant", "content": "the"}])),
            "streamed": (anthropic.NotFoundError, lambda: full.messages.create(model="missing", stream=True, **ask)),
        }
        errors = {}
        for kind, (error_class, call) in refusals.items():
            with pytest.raises(error_class) as raised:
                await call()
            errors[kind] = raised.value
        for client in (support, full, wrong, bearer):
            await client.close()
        no_max_tokens = await asyncio.to_thread(post, f"{url}/messages", {"model": ADAPTER, "messages": ASK},
                                                "k-full-1234")
        not_json_status, not_json = await asyncio.to_thread(_raw_post, f"{url}/messages", b"{not json", "k-full-1234")
    assert all(text_of(message) for message in served)  # x-api-key and Authorization: Bearer both authenticate
    assert {kind: (e.status_code, e.type) for kind, e in errors.items()} == {
        "no key": (401, "authentication_error"), "not allowed": (403, "permission_error"),
        "unknown model": (404, "not_found_error"), "bad type": (400, "invalid_request_error"),
        "over the limit": (400, "invalid_request_error"), "bad top_k": (400, "invalid_request_error"),
        "image": (400, "invalid_request_error"), "prefill": (400, "invalid_request_error"),
        "streamed": (404, "not_found_error")}
    assert all(e.body["type"] == "error" for e in errors.values())
    assert errors["bad type"].api_message == "max_tokens: must be an integer"
    assert errors["over the limit"].api_message.startswith("max_tokens: ")
    assert errors["bad top_k"].api_message.startswith("top_k: ")
    assert errors["image"].api_message.startswith("messages: ") and "'image'" in errors["image"].api_message
    assert no_max_tokens == (400, {"type": "error", "error": {"type": "invalid_request_error",
                                                              "message": "max_tokens: is required"}})
    assert not_json_status == 400 and not_json["error"]["message"].startswith("body: is not valid JSON")


def _raw_post(url: str, data: bytes, key: str) -> tuple[int, dict]:
    """POST raw bytes with an x-api-key header: (status, JSON answer)."""
    request = urllib.request.Request(url, method="POST", data=data, headers={"x-api-key": key,
                                                                             "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}}, "required": ["zone"],
        "additionalProperties": False}
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER},
                   {"name": "get_time", "description": "Time in a zone", "input_schema": TIME}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                  "parameters": t["input_schema"]}} for t in ANTHROPIC_TOOLS]
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.slow
async def test_tool_use_maps_onto_the_openai_routes_tool_calls():
    """SmolLM2 (its template has no tool support: core/tools.py's preamble): a forced call (named, and "any"),
    unary and streamed, equals the OpenAI route's greedy call; a tool_result round trip answers as the OpenAI
    route does after a "tool" message."""
    async with serving((default_model_path(), {}), engine=EngineConfig(kv_cache_bytes=256 * 2**20)) as (_app, url):
        claude, gpt = clients(url)
        named = dict(model="", messages=WEATHER_ASK, max_tokens=60, extra_body={"temperature": 0},
                     tools=ANTHROPIC_TOOLS, tool_choice={"type": "tool", "name": "get_weather"})
        unary = await claude.messages.create(**named)
        async with claude.messages.stream(**named) as stream:
            streamed = await stream.get_final_message()
        expected = await gpt.chat.completions.create(
            model="", messages=WEATHER_ASK, max_tokens=60, temperature=0, tools=OPENAI_TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        anyone = await claude.messages.create(model="", messages=WEATHER_ASK, max_tokens=90, tools=ANTHROPIC_TOOLS,
                                              tool_choice={"type": "any"}, extra_body={"temperature": 1.0, "seed": 3})
        call = expected.choices[0].message.tool_calls[0]
        result = "18 degrees, sunny"
        returned = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": unary.content[0].id,
                                                 "content": result}]}
        answered = await claude.messages.create(model="", max_tokens=12, extra_body={"temperature": 0},
                                                tools=ANTHROPIC_TOOLS, messages=[
                                                    *WEATHER_ASK, {"role": "assistant", "content": unary.content},
                                                    returned])
        expected_answer = await gpt.chat.completions.create(
            model="", max_tokens=12, temperature=0, tools=OPENAI_TOOLS, messages=[
                *WEATHER_ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": result}])
        await claude.close()
        await gpt.close()
    for message in (unary, streamed):
        assert message.stop_reason == "tool_use" and [b.type for b in message.content] == ["tool_use"]
        assert message.content[0].name == "get_weather" and message.content[0].id.startswith("toolu_")
        assert message.content[0].input == json.loads(call.function.arguments)
    jsonschema.validate(unary.content[0].input, WEATHER)
    assert anyone.stop_reason == "tool_use" and anyone.content
    for block in anyone.content:
        jsonschema.validate(block.input, {"get_weather": WEATHER, "get_time": TIME}[block.name])
    reply = expected_answer.choices[0].message
    if reply.tool_calls:  # the model calls again: the same calls
        assert [(b.name, b.input) for b in answered.content] == [(c.function.name, json.loads(c.function.arguments))
                                                                 for c in reply.tool_calls]
    else:
        assert text_of(answered) == reply.content
