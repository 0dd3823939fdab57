"""`core.generation.GenerationCore` alone, without a transport: tokens with their text and the completion,
validation and authorization before the first token, StopGeneration, drain, the read-outs."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraplex.client.records import FinishReason
from loraplex.server.core.auth import ApiKey, Authenticator
from loraplex.server.core.calls import ChatMessage, GenerateCall, StopGeneration
from loraplex.server.core.errors import AdapterNotFound, InvalidRequest, PermissionDenied, Unauthenticated
from loraplex.server.core.generation import GenerationCore
from loraplex.server.core.requests import RequestLimits
from loraplex.server.core.scheduler import Scheduler
from loraplex.server.core.scheduler_config import SchedulerConfig
from loraplex.server.core.validation import MAX_CHARS_PER_POSITION
from loraplex.server.engine import SamplingParams
from serving_support import adapter_manager, generate_alone, make_engine

KEYS = [ApiKey(name="support-only", sha256=hashlib.sha256(b"s").hexdigest(), adapters=frozenset({"a_r4_qv"}))]


@asynccontextmanager
async def started_core(serving_model, keys: list[ApiKey]):
    """A started GenerationCore over the tiny model, its own adapter store, checking `keys` (none: open)."""
    base, adapters = serving_model
    engine = make_engine(base)
    manager = adapter_manager(engine, adapters, Path(tempfile.mkdtemp(prefix="generation-store-")))
    scheduler = Scheduler(engine, manager, SchedulerConfig())
    core = GenerationCore(scheduler, manager, AutoTokenizer.from_pretrained(base), Authenticator(keys),
                          RequestLimits(8, 16), base.name)
    scheduler.start()
    try:
        yield core
    finally:
        scheduler.close()
        manager.close()
        core.close()


@pytest.fixture
async def core(serving_model):
    async with started_core(serving_model, []) as started:
        yield started


@pytest.fixture
async def keyed_core(serving_model):
    async with started_core(serving_model, KEYS) as started:
        yield started


async def collect(core: GenerationCore, call: GenerateCall, authorization: str | None = None):
    return [token async for token in core.generate(authorization, call)]


async def test_tokens_carry_their_text_and_the_last_one_the_completion(core, serving_model) -> None:
    call = GenerateCall(adapter="a_r4_qv", prompt="hello world", max_new_tokens=5, ignore_eos=True)
    tokens = await collect(core, call)
    prompt_ids = core.tokenizer("hello world")["input_ids"]
    expected = generate_alone(make_engine(serving_model[0], serving_model[1]), serving_model[1], prompt_ids,
                              "a_r4_qv", SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert [token.id for token in tokens] == expected
    assert "".join(token.text for token in tokens) == core.tokenizer.decode(expected)
    assert tokens[0].prompt_tokens == len(prompt_ids) and all(t.prompt_tokens == 0 for t in tokens[1:])
    assert all(token.completion is None for token in tokens[:-1])
    done = tokens[-1].completion
    assert (done.finish_reason, done.prompt_tokens, done.generated_tokens) == (FinishReason.LENGTH, len(prompt_ids), 5)
    assert done.adapter == "a_r4_qv" and len(done.adapter_version) == 64


async def test_the_models_own_name_means_the_base(core) -> None:
    tokens = await collect(core, GenerateCall(adapter=core.model_name, prompt=[1, 2, 3], max_new_tokens=2))
    assert tokens[-1].completion.adapter == "" and tokens[-1].completion.adapter_version == ""


async def test_logprobs_are_reported_only_when_asked(core) -> None:
    plain = await collect(core, GenerateCall(adapter="", prompt=[1, 2, 3], max_new_tokens=2))
    asked = await collect(core, GenerateCall(adapter="", prompt=[1, 2, 3], max_new_tokens=2, logprobs=True,
                                             top_logprobs=3))
    assert all(t.logprob is None and t.piece == "" and not t.top_logprobs for t in plain)
    assert all(t.logprob is not None and len(t.top_logprobs) == 3 for t in asked)


@pytest.mark.parametrize(("call", "field"), [
    (GenerateCall(adapter="", prompt=""), "prompt"),
    (GenerateCall(adapter="", prompt=[]), "prompt"),
    (GenerateCall(adapter="", prompt=[1, 2], chat=True), "chat"),
    (GenerateCall(adapter="", prompt=[1, 2], max_new_tokens=17), "max_new_tokens"),
    (GenerateCall(adapter="", prompt=[1, 2], stop_token_ids=(96,)), "stop_token_ids"),
    (GenerateCall(adapter="", prompt=[1, 2], sampling={"temperature": -1.0}), "temperature"),
    (GenerateCall(adapter="bad name!", prompt=[1, 2]), "adapter"),
])
async def test_a_bad_call_is_refused_before_the_first_token_naming_its_field(core, call, field) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await collect(core, call)
    assert caught.value.field == field


async def test_a_text_too_long_for_the_model_is_refused_untokenized(core) -> None:
    text = "x" * (MAX_CHARS_PER_POSITION * core.engine.max_model_len + 1)
    with pytest.raises(InvalidRequest, match="max_model_len"):
        await collect(core, GenerateCall(adapter="", prompt=text))


async def test_an_unknown_adapter_is_not_found(core) -> None:
    with pytest.raises(AdapterNotFound):
        await collect(core, GenerateCall(adapter="nobody", prompt=[1, 2]))


async def test_a_conversation_goes_through_the_chat_template_or_is_refused(core) -> None:
    call = GenerateCall(adapter="", prompt=[ChatMessage("user", "hello")], max_new_tokens=1)
    with pytest.raises(InvalidRequest, match="no chat template") as caught:
        await collect(core, call)
    assert caught.value.field == "messages"


async def test_keys_and_allow_lists_are_checked_first(keyed_core) -> None:
    core = keyed_core
    call = GenerateCall(adapter="a_r4_qv", prompt=[1, 2], max_new_tokens=1)
    with pytest.raises(Unauthenticated):
        await collect(core, call)
    with pytest.raises(PermissionDenied, match="may not use the base model"):
        await collect(core, GenerateCall(adapter="", prompt=[1, 2]), "Bearer s")
    assert len(await collect(core, call, "Bearer s")) == 1
    listed = await core.models("Bearer s")
    assert listed.base is None and [name for name, _ in listed.adapters] == ["a_r4_qv"]


async def test_stop_generation_ends_the_request_as_finished_and_drain_returns(core) -> None:
    tokens = core.generate(None, GenerateCall(adapter="", prompt=[1, 2, 3], max_new_tokens=16, ignore_eos=True))
    first = await anext(tokens)
    with pytest.raises(StopAsyncIteration):
        await tokens.athrow(StopGeneration())
    assert first.completion is None
    assert await core.drain(5.0)


async def test_drain_waits_for_a_generation_in_flight(core) -> None:
    tokens = core.generate(None, GenerateCall(adapter="", prompt=[1, 2, 3], max_new_tokens=16, ignore_eos=True))
    await anext(tokens)
    assert not await core.drain(0.05)
    rest = asyncio.create_task(collect_rest(tokens))
    assert await core.drain(10.0) and len(await rest) == 15


async def collect_rest(tokens) -> list:
    return [token async for token in tokens]


async def test_server_facts_report_the_engine_the_limits_and_the_adapters(core, serving_model) -> None:
    facts = await core.server_facts(None)
    assert (facts.vocab_size, facts.max_new_tokens_limit, facts.default_max_new_tokens) == (96, 16, 8)
    assert facts.architecture == "llama" and facts.has_tokenizer and not facts.has_chat_template
    assert facts.adapter_slots == 4 and facts.max_adapter_rank == 64
    assert sorted(adapter.name for adapter in facts.adapters) == sorted(serving_model[1])
    assert all(adapter.rank > 0 and len(adapter.version) == 64 for adapter in facts.adapters)
