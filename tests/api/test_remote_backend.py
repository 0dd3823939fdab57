"""`loraplex http-shim --grpc-target`: the HTTP API as a separate process in front of a real server's gRPC
port answers like the shim inside the server (same tokens, logprobs, errors, admin listing), forwards API keys
to the server, reports readiness from the server's health service, and exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from loraplex.adapters.identity import adapter_digest
from loraplex.server.core.auth import ApiKey
from loraplex.server.settings import AdapterSettings
from serving_support import (
    TOKENIZER_CORPUS,
    get,
    post,
    serving,
    start_translator,
    status_of,
    with_chat_template,
)

LORAPLEX = str(Path(sys.executable).parent / "loraplex")
ADMIN, USER = "k-admin-1234", "k-user-1234"
KEYS = [ApiKey(name="admin", sha256=hashlib.sha256(ADMIN.encode()).hexdigest(), scopes={"admin", "inference"}),
        ApiKey(name="user", sha256=hashlib.sha256(USER.encode()).hexdigest(), adapters={"a_r4_qv"})]


def completions(url: str, key: str, **body) -> tuple[int, dict]:
    return post(f"{url}/completions", body, key)


async def test_translator_answers_like_the_embedded_shim(serving_model, tmp_path):
    chat_model = with_chat_template(serving_model, tmp_path / "base")
    gate = serving_model[1]["d_r8_k_gate"]
    store = AdapterSettings(store=tmp_path / "store", allowed_roots=[gate.parent])
    async with serving(chat_model, api_keys=KEYS, adapters=store) as (app, embedded_url):
        process, url = await asyncio.to_thread(start_translator, app.port)
        try:
            request = dict(model="a_r4_qv", prompt=TOKENIZER_CORPUS[3], max_tokens=8, temperature=0, logprobs=2)
            # one after the other: each runs alone in its batch, so even the logprobs' last bits agree; the
            # translator's salt keeps it from reusing the first one's prefix (usage would count cached tokens)
            here = await asyncio.to_thread(completions, embedded_url, USER, **request)
            there = await asyncio.to_thread(completions, url, USER, **request, cache_salt="translated")
            remote = openai.AsyncOpenAI(base_url=url, api_key=ADMIN, max_retries=0)
            messages = [{"role": "user", "content": "hello world"}]
            chat = await remote.chat.completions.create(model="b_r16_all", messages=messages, max_tokens=6,
                                                        temperature=0, n=2, logprobs=True, top_logprobs=1)
            stream = await remote.chat.completions.create(model="b_r16_all", messages=messages, max_tokens=6,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            models = [m.id for m in (await remote.models.list()).data]
            errors = {kind: await asyncio.to_thread(completions, url, key, **body) for kind, (key, body) in {
                "unknown model": (ADMIN, {"model": "missing", "prompt": "hi"}),
                "too long": (ADMIN, {"model": "a_r4_qv", "prompt": "hi", "max_tokens": 10**6}),
                "bad penalty": (ADMIN, {"model": "a_r4_qv", "prompt": "hi", "presence_penalty": 5}),
                "no key": ("wrong", {"model": "a_r4_qv", "prompt": "hi"}),
                "not allowed": (USER, {"model": "b_r16_all", "prompt": "hi"}),
            }.items()}
            refused_load = await asyncio.to_thread(post, f"{url}/load_lora_adapter",
                                                   {"lora_name": "gate", "lora_path": str(gate)}, USER)
            loaded = await asyncio.to_thread(post, f"{url}/load_lora_adapter",
                                             {"lora_name": "gate", "lora_path": str(gate)}, ADMIN)
            unloaded = await asyncio.to_thread(post, f"{url}/unload_lora_adapter", {"lora_name": "gate"}, ADMIN)
            ready_while_serving = await asyncio.to_thread(status_of, f"{url.removesuffix('/v1')}/ready")
            listings = [await asyncio.to_thread(get, f"{where}/admin/adapters", key)
                        for where, key in ((embedded_url, ADMIN), (url, ADMIN), (url, USER))]
            playground = await asyncio.to_thread(status_of, f"{url.removesuffix('/v1')}/")
            await remote.close()
            await app.stop(0)
            ready_after_stop = await asyncio.to_thread(status_of, f"{url.removesuffix('/v1')}/ready")
            after_stop = await asyncio.to_thread(completions, url, ADMIN, model="a_r4_qv", prompt="hi")
        finally:
            process.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(process.wait, 30)
    assert here[0] == there[0] == 200
    assert there[1]["choices"] == here[1]["choices"] and there[1]["usage"] == here[1]["usage"]
    assert there[1]["choices"][0]["logprobs"]["top_logprobs"][0]  # the alternatives made the trip
    assert [c.message.content for c in chat.choices] == [chat.choices[0].message.content] * 2
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens // 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens // 2
    assert models == [chat_model[0].name, *serving_model[1]]
    assert {kind: status for kind, (status, _) in errors.items()} == {
        "unknown model": 404, "too long": 400, "bad penalty": 400, "no key": 401, "not allowed": 403}
    assert errors["unknown model"][1]["error"]["code"] == "model_not_found"
    assert errors["too long"][1]["error"]["param"] == "max_tokens"
    assert errors["bad penalty"][1]["error"]["param"] == "presence_penalty"
    assert refused_load[0] == 403 and loaded == (200, {"lora_name": "gate", "version": adapter_digest(gate)})
    assert unloaded == (200, {"lora_name": "gate", "removed_versions": [adapter_digest(gate)]})
    assert (ready_while_serving, ready_after_stop) == (200, 503)
    assert listings[0][0] == listings[1][0] == 200 and listings[1][1] == listings[0][1]  # the same ListAdapters
    assert [a["name"] for a in listings[1][1]["adapters"]] == list(serving_model[1]) and listings[2][0] == 403
    assert playground == 200
    assert after_stop[0] == 503 and after_stop[1]["error"]["type"] == "service_unavailable"
    assert exit_code == 0


def test_translator_refuses_a_taken_port():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run([LORAPLEX, "http-shim", "--host", "127.0.0.1", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{port} (HTTP)" in done.stderr, done.stderr


async def test_a_refusal_over_a_quota_keeps_its_retry_after_through_the_translator(serving_model):
    quotas = {"tenants": {"user": {"tokens_per_minute": 60, "burst_tokens": 10}}}  # 1 token/s, 10 at most
    async with serving(serving_model, api_keys=KEYS, quotas=quotas) as (app, _):
        process, url = await asyncio.to_thread(start_translator, app.port)
        remote = openai.AsyncOpenAI(base_url=url, api_key=USER, max_retries=0)
        try:
            spent = await remote.completions.create(model="a_r4_qv", prompt="hello world", max_tokens=12,
                                                    extra_body={"ignore_eos": True})
            with pytest.raises(openai.RateLimitError) as refused:
                await remote.completions.create(model="a_r4_qv", prompt="hello world", max_tokens=2)
        finally:
            await remote.close()
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait, 30)
    assert spent.usage.completion_tokens == 12
    assert refused.value.status_code == 429 and int(refused.value.response.headers["retry-after"]) >= 1
    assert "tenant 'user' is over its tokens_per_minute of 60" in refused.value.body["message"]
