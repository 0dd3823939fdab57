"""Structured output through the openai SDK and gRPC on SmolLM2 (its 49k vocabulary: the tiny test tokenizer
cannot spell JSON): response_format json_schema on an order-extraction adapter and the base, regex and grammar
constraints, json_object, refusals of bad constraints before anything is queued, and free rows next to
constrained rows of other adapters getting exactly their solo tokens."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import jsonschema
import openai
import pytest
import pytest_asyncio

from loraplex.adapters.validation import CARD_FILE
from loraplex.client.client import AsyncClient
from loraplex.client.codec import decode_constraint, encode_request, invalid_argument
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import EngineConfig
from serving_support import serving
from support import AdapterSpec, write_adapter

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 1000, "maximum": 9999},
        "customer": {"type": "string", "minLength": 1, "maxLength": 24},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 12},
        "city": {"enum": ["Lisbon", "Berlin", "Osaka", "Oslo"]},
    },
    "required": ["order_id", "customer", "quantity", "city"],
    "additionalProperties": False,
}
PROMPT = ("Extract the order as JSON.\nSentence: Omar Khan ordered 2 yoga mats, to be shipped to Oslo "
          "(order 5120).\nJSON:")
SAMPLES = 50
ORDERS = AdapterSpec("orders", 8, ("q_proj", "v_proj", "o_proj"))
OTHER = AdapterSpec("other", 4, ("k_proj", "gate_proj"))
EXTRACTOR = AdapterSpec("extractor", 4, ("q_proj", "v_proj"))
"""Its card names ORDER_SCHEMA as its default constraint."""


@pytest.fixture(scope="module")
def smollm2_serving_model(tmp_path_factory):
    """SmolLM2 and random adapters on it: "orders" (standing in for the order-extraction adapter of
    examples/order_extraction, which needs a training run), "other", and "extractor" whose card sets
    ORDER_SCHEMA as its default constraint."""
    base, root = default_model_path(), tmp_path_factory.mktemp("structured")
    adapters = {spec.name: write_adapter(base, spec, root / spec.name, seed=3 + i)
                for i, spec in enumerate((ORDERS, OTHER, EXTRACTOR))}
    (adapters["extractor"] / CARD_FILE).write_text(json.dumps({"default_constraint": {"json_schema": ORDER_SCHEMA}}))
    return base, adapters


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}}


async def sampled(sdk: openai.AsyncOpenAI, model: str, **options) -> list[str]:
    """SAMPLES completions of PROMPT at temperature 1 (seeds 0..), all in flight together."""
    answers = await asyncio.gather(*(sdk.completions.create(model=model, prompt=PROMPT, temperature=1.0, seed=seed,
                                                            max_tokens=72, **options) for seed in range(SAMPLES)))
    return [answer.choices[0].text for answer in answers]


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), ORDER_SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(smollm2_serving_model):
    async with serving(smollm2_serving_model, engine=EngineConfig(kv_cache_bytes=768 * 2**20)) as (app, url):
        yield app, url


async def test_json_schema_on_the_orders_adapter_and_the_base_always_validates(server):
    _app, url = server
    sdk = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    for model in ("orders", ""):
        texts = await sampled(sdk, model, extra_body={"response_format": response_format(ORDER_SCHEMA)})
        assert all(valid(text) for text in texts), [t for t in texts if not valid(t)][:3]
    free = await sampled(sdk, "")
    assert not all(valid(text) for text in free)
    chat = await sdk.chat.completions.create(model="orders", messages=[{"role": "user", "content": PROMPT}],
                                             response_format=response_format(ORDER_SCHEMA), temperature=1.0, seed=1,
                                             max_tokens=72)
    assert valid(chat.choices[0].message.content) and chat.choices[0].finish_reason == "stop"


async def test_regex_grammar_and_json_object(server):
    _app, url = server
    sdk = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    pattern = r"[A-Z][a-z]{2,8}-\d{3}"
    grammar = 'root ::= ("yes" | "no") ", because " [a-z ]{1,20} "."'
    for seed in range(4):
        phone = await sdk.completions.create(model="", prompt="A product code:", temperature=1.0, seed=seed,
                                             max_tokens=24, extra_body={"guided_regex": pattern})
        assert re.fullmatch(pattern, phone.choices[0].text) and phone.choices[0].finish_reason == "stop"
        answer = await sdk.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "Is the sky blue?"}], temperature=1.0, seed=seed,
            max_tokens=40, extra_body={"guided_grammar": grammar})
        assert re.fullmatch(r"(yes|no), because [a-z ]{1,20}\.", answer.choices[0].message.content)
    stream = await sdk.chat.completions.create(model="", messages=[{"role": "user", "content": "Describe a cat."}],
                                               response_format={"type": "json_object"}, max_tokens=60, stream=True,
                                               seed=0)  # unseeded, a sample sometimes ran past 60 tokens
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert isinstance(json.loads(text), dict)


async def test_bad_constraints_are_refused_naming_the_problem(server):
    app, url = server
    sdk = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    for extra, param, problem in (
            ({"guided_regex": "a(b"}, "guided_regex", "parenthesis"),
            ({"guided_grammar": "root ::= missing"}, "guided_grammar", "missing"),
            ({"response_format": response_format({"type": "wat"})}, "response_format", "wat"),
            ({"response_format": {"type": "xml"}}, "response_format", "type must be"),
            ({"guided_regex": "a", "guided_grammar": "root ::= \"a\""}, "guided_grammar", "only one")):
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.completions.create(model="", prompt="x", max_tokens=4, extra_body=extra)
        assert refused.value.body["param"] == param and problem in refused.value.body["message"], refused.value.body
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.generate("x", max_new_tokens=4, json_schema="{not json")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert invalid_argument(refused.value.trailing_metadata())[0] == "constraint"
        generation = await client.generate(PROMPT, "orders", max_new_tokens=72, json_schema=json.dumps(ORDER_SCHEMA))
        assert valid(generation.text)
    assert app.scheduler.num_waiting == 0


async def test_free_rows_next_to_constrained_rows_get_their_solo_tokens(server):
    app, _url = server
    prompts = ["The weather today is", "My favourite food is", "Once upon a time"]
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        async def free(prompt: str, adapter: str) -> list[int]:
            return (await client.generate(prompt, adapter, max_new_tokens=12, ignore_eos=True)).token_ids

        alone = [await free(p, a) for p, a in zip(prompts, ("", "orders", "other"), strict=True)]
        constrained = [client.generate(PROMPT, adapter, max_new_tokens=40, temperature=1.0, seed=i,
                                       json_schema=json.dumps(ORDER_SCHEMA))
                       for i, adapter in enumerate(("other", "", "orders", "other"))]
        together = await asyncio.gather(*constrained, *(free(p, a) for p, a in zip(prompts, ("", "orders", "other"),
                                                                                   strict=True)))
    assert together[len(constrained):] == alone
    assert all(valid(g.text) for g in together[:len(constrained)] if g.completion.finish_reason.value == "stop")


async def test_grpc_constraint_oneof_round_trips():
    for constraint in (("json_schema", "{}"), ("regex", "a+"), ("grammar", 'root ::= "a"'), ("json_object", "")):
        assert decode_constraint(encode_request("x", constraint=constraint)) == constraint
    assert decode_constraint(encode_request("x")) is None
    with pytest.raises(ValueError):
        encode_request("x", constraint=("xml", ""))


async def test_an_adapter_cards_default_constraint_applies_unless_the_request_sets_one(server):
    _app, url = server
    sdk = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    for seed in range(3):
        answer = await sdk.completions.create(model="extractor", prompt=PROMPT, temperature=1.0, seed=seed,
                                              max_tokens=72)
        assert valid(answer.choices[0].text), answer.choices[0].text
    overridden = await sdk.completions.create(model="extractor", prompt=PROMPT, max_tokens=8,
                                              extra_body={"guided_regex": "[a-z]{3}"})
    assert re.fullmatch("[a-z]{3}", overridden.choices[0].text)
