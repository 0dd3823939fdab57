"""Prompt log-probabilities on a real server (tiny model): /v1/completions echo + logprobs (max_tokens 0, token-id
and list prompts) and gRPC prompt_logprobs give the engine's own prompt logprobs, the first token's null."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.client.client import AsyncClient
from loraplex.server.engine import SamplingParams
from serving_support import make_engine, post, serving

PROMPT = [5, 17, 33, 2, 60, 8, 41, 12, 9]


@pytest.fixture(scope="module")
def expected(serving_model):
    """The engine's prompt logprobs of PROMPT on the base model (and its top-1 alternatives)."""
    base, _ = serving_model
    engine = make_engine(base)
    seq = engine.add_sequence(PROMPT, SamplingParams(max_new_tokens=1, prompt_logprobs=True, top_logprobs=1))
    event = engine.step([(seq, seq.num_pending)])[0]
    return [None] + [entry.logprob for entry in event.prompt_logprobs]


async def test_echo_logprobs_and_grpc_prompt_logprobs(serving_model, expected):
    async with serving(serving_model) as (app, url):
        completions = f"{url}/completions"
        status, body = await asyncio.to_thread(post, completions, {"model": "", "prompt": [PROMPT, PROMPT[:4]],
                                                                   "echo": True, "logprobs": 1, "max_tokens": 0})
        assert status == 200, body
        first, second = body["choices"]
        assert first["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-5)
        assert second["logprobs"]["token_logprobs"] == pytest.approx(expected[:4], abs=1e-5)
        assert first["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
        tops = first["logprobs"]["top_logprobs"][1:]
        assert all(max(top.values()) >= logprob - 1e-6 for top, logprob in zip(tops, expected[1:], strict=True))
        status, body = await asyncio.to_thread(post, completions, {"model": "", "prompt": "hello world", "echo": True,
                                                                   "max_tokens": 2, "ignore_eos": True})
        assert body["choices"][0]["text"].startswith("hello world") and body["choices"][0]["logprobs"] is None
        status, body = await asyncio.to_thread(post, completions, {"model": "", "prompt": "hello", "max_tokens": 0})
        assert status == 400 and body["error"]["param"] == "max_tokens"
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            generation = await client.generate(PROMPT, max_new_tokens=1, prompt_logprobs=True)
            streamed = [chunk async for chunk in client.generate_stream(PROMPT, max_new_tokens=2, ignore_eos=True,
                                                                        prompt_logprobs=True)]
        assert [t.logprob for t in generation.prompt_logprobs] == pytest.approx(expected, abs=1e-5)
        assert [t.id for t in generation.prompt_logprobs] == PROMPT
        assert [t.logprob for t in streamed[0].prompt_logprobs] == pytest.approx(expected, abs=1e-5)
        assert streamed[1].prompt_logprobs is None
