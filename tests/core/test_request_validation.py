"""`core.validation.RequestChecks`: each check names GenerateCall's field; the adapter reference is parsed
into the value the lease takes; and on a real server the same bad field is INVALID_ARGUMENT over gRPC
(the field in the trailing metadata) and 400 over HTTP (the field as the body names it)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import grpc
import pytest

from loraplex.adapters.reference import AdapterReference
from loraplex.client.codec import encode_request, invalid_argument
from loraplex.server.core.adapter_runtime.leases import BASE_REFERENCE
from loraplex.server.core.calls import ChatMessage, EngineFacts, GenerateCall
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.requests import RequestLimits
from loraplex.server.core.scheduler import Scheduler
from loraplex.server.core.scheduler_config import SchedulerConfig
from loraplex.server.core.validation import MAX_CHARS_PER_POSITION, RequestChecks
from loraplex.server.engine import SamplingParams
from loraplex.v1 import generation_pb2_grpc as pb_grpc
from serving_support import adapter_manager, make_engine, post, serving

VERSION = "0123456789abcdef"
ENGINE = EngineFacts("llama", vocab_size=96, max_model_len=128, adapter_slots=4, max_adapter_rank=64,
                     kv_block_size=4, kv_blocks=14)
CHECKS = RequestChecks(RequestLimits(default_max_new_tokens=8, max_new_tokens_limit=200), ENGINE)


class Tokenizer:
    """Stands in for a tokenizer: the checks only ask whether it has a chat template."""

    def __init__(self, chat_template: str | None) -> None:
        self.chat_template = chat_template


def refused(check, *args) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        check(*args)
    assert str(caught.value).startswith(f"{caught.value.field}: ")
    return caught.value


def test_the_adapter_reference_is_parsed_once_into_what_the_lease_takes() -> None:
    assert CHECKS.adapter("") is BASE_REFERENCE
    assert CHECKS.adapter("support") == AdapterReference("support")
    assert CHECKS.adapter(f"support@{VERSION}") == AdapterReference("support", VERSION)
    for malformed in ("bad name!", "../x", "support@XYZ", "a" * 65):
        assert refused(CHECKS.adapter, malformed).field == "adapter"


@pytest.mark.parametrize(("call", "tokenizer", "field", "message"), [
    (GenerateCall("", ""), Tokenizer(None), "prompt", "must not be empty"),
    (GenerateCall("", []), Tokenizer(None), "prompt", "must not be empty"),
    (GenerateCall("", [1, 2], chat=True), Tokenizer(None), "chat", "needs text input"),
    (GenerateCall("", "hi"), None, "prompt", "no tokenizer"),
    (GenerateCall("", "x" * (MAX_CHARS_PER_POSITION * 128 + 1)), Tokenizer(None), "prompt", "characters"),
    (GenerateCall("", [ChatMessage("user", "hi")]), Tokenizer(None), "messages", "no chat template"),
    (GenerateCall("", "hi", chat=True), Tokenizer(None), "chat", "no chat template"),
])
def test_a_prompt_the_model_cannot_take_is_refused_before_tokenizing(call, tokenizer, field, message) -> None:
    error = refused(CHECKS.prompt, call, tokenizer)
    assert error.field == field and message in error.problem


def test_a_prompt_goes_to_the_tokenizer_as_text_ids_or_a_conversation() -> None:
    with_template = Tokenizer("{{ messages }}")
    assert CHECKS.prompt(GenerateCall("", (1, 2)), None) == [1, 2]
    assert CHECKS.prompt(GenerateCall("", "hi"), with_template) == "hi"
    assert CHECKS.prompt(GenerateCall("", "hi", chat=True), with_template) == [ChatMessage("user", "hi")]


@pytest.mark.parametrize(("call", "field", "message"), [
    (GenerateCall("", [1], max_new_tokens=0), "max_new_tokens", "outside [1, 200]"),
    (GenerateCall("", [1], max_new_tokens=201), "max_new_tokens", "this server's limit"),
    (GenerateCall("", [1], stop_token_ids=(96,)), "stop_token_ids", "[0, 96)"),
    (GenerateCall("", [1], sampling={"temperature": -1.0}), "temperature", "temperature=-1.0"),
    (GenerateCall("", [1], sampling={"top_p": float("nan")}), "top_p", "top_p=nan"),
    (GenerateCall("", [1], top_logprobs=21), "top_logprobs", "top_logprobs=21"),
])
def test_sampling_outside_the_limits_or_the_engines_bounds_is_refused(call, field, message) -> None:
    error = refused(CHECKS.sampling, call)
    assert error.field == field and message in error.problem


def test_sampling_takes_the_servers_default_max_new_tokens() -> None:
    assert CHECKS.sampling(GenerateCall("", [1], sampling={"temperature": 0.5})) == SamplingParams(
        max_new_tokens=8, temperature=0.5)


def test_token_ids_must_fit_the_model_and_the_kv_pool() -> None:
    fits = SamplingParams(max_new_tokens=4)
    CHECKS.prompt_ids([1, 2], fits)
    CHECKS.prompt_ids([1] * 52, fits)  # 56 positions: the whole pool of 14 blocks of 4
    assert refused(CHECKS.prompt_ids, [], fits).problem == "prompt must hold at least one token"
    assert refused(CHECKS.prompt_ids, [1] * 128, fits).problem == "prompt of 128 tokens leaves no room in " \
                                                                  "max_model_len=128"
    assert refused(CHECKS.prompt_ids, [1, 96], fits).problem == "prompt token ids must lie in [0, 96)"
    too_many = refused(CHECKS.prompt_ids, [1] * 53, fits)
    assert too_many.field == "max_new_tokens" and too_many.problem == (
        "prompt plus max_new_tokens needs 15 KV blocks; the whole cache holds 14: ask for fewer tokens")


def test_the_engine_facts_are_the_engines_own(serving_model) -> None:
    base, adapters = serving_model
    engine = make_engine(base, kv_cache_bytes=14 * 2 * 2 * 4 * 2 * 16 * 4)  # 14 blocks of the tiny llama
    manager = adapter_manager(engine, adapters, Path(tempfile.mkdtemp(prefix="validation-store-")))
    facts = Scheduler(engine, manager, SchedulerConfig()).engine_facts()
    manager.close()
    assert (facts.vocab_size, facts.max_model_len) == (engine.spec.vocab_size, engine.max_model_len)
    assert (facts.kv_block_size, facts.kv_blocks) == (engine.cache.block_size, 14)
    assert facts.blocks_for(engine.cache.block_size + 1) == engine.cache.blocks_needed(engine.cache.block_size + 1)


# The same bad field through both transports: (GenerateRequest, its field), (OpenAI completions body, its param).
BAD_FIELDS = {
    "temperature": (encode_request([1, 2], sampling={"temperature": -1.0}), "sampling.temperature",
                    {"prompt": [1, 2], "temperature": -1.0}, "temperature"),
    "max_new_tokens": (encode_request([1, 2], max_new_tokens=10**6), "stopping.max_new_tokens",
                       {"prompt": [1, 2], "max_tokens": 10**6}, "max_tokens"),
    "adapter": (encode_request([1, 2], "bad name!"), "adapter", {"prompt": [1, 2], "model": "bad name!"}, "model"),
    "prompt ids": (encode_request([1] * 4096), "prompt", {"prompt": [1] * 4096}, "prompt"),
    "empty text": (encode_request(""), "text", {"prompt": ""}, "prompt"),
}


async def test_the_same_bad_field_is_invalid_argument_over_grpc_and_400_over_http(serving_model) -> None:
    async with serving(serving_model) as (app, url), grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        for case, (request, field, body, param) in BAD_FIELDS.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
            named, problem = invalid_argument(caught.value.trailing_metadata())
            assert named == field, case
            assert caught.value.details() == f"{field}: {problem}", case
            status, answer = await asyncio.to_thread(post, f"{url}/completions", body)
            assert status == 400, (case, answer)
            error = answer["error"]
            assert (error["param"], error["type"]) == (param, "invalid_request_error"), case
            assert error["message"] == f"{param}: {problem}", case


def test_a_priority_is_interactive_or_batch() -> None:
    assert CHECKS.priority(GenerateCall("", "hi")) == "interactive"  # unset: the tenant's class decides
    assert CHECKS.priority(GenerateCall("", "hi", priority="batch")) == "batch"
    assert refused(CHECKS.priority, GenerateCall("", "hi", priority="urgent")).field == "priority"
