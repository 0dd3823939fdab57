"""Tool calling on /v1/chat/completions with the openai SDK on SmolLM2 (its template has no tool support: the
system preamble of core/tools.py): required, named and auto choices, unary and streamed, arguments valid for
the function's schema; a tool result round trip; the rendering and parsing of core/tools.py."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import pytest_asyncio

from loraplex.server.core.calls import ChatMessage, Tool, ToolCall
from loraplex.server.core.tools import call_constraint, conversation, parse_reply, template_knows_tools
from loraplex.server.default_model import default_model_path
from loraplex.server.engine import EngineConfig
from serving_support import serving

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def assert_valid_calls(calls) -> None:
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sdk():
    async with serving((default_model_path(), {}), engine=EngineConfig(kv_cache_bytes=256 * 2**20)) as (_app, url):
        yield openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_required_and_named_calls_unary_and_streamed(sdk):
    for seed in range(3):
        answer = await sdk.chat.completions.create(model="", messages=ASK, tools=TOOLS, tool_choice="required",
                                                   temperature=1.0, seed=seed, max_tokens=60)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message.tool_calls)
    named = await sdk.chat.completions.create(model="", messages=ASK, tools=TOOLS, max_tokens=60,
                                              tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    assert_valid_calls(named.choices[0].message.tool_calls)
    stream = await sdk.chat.completions.create(model="", messages=ASK, tools=TOOLS, max_tokens=60, stream=True,
                                               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas, reasons = {}, []
    async for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = deltas.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls" and [d["name"] for d in deltas.values()] == ["get_weather"]
    jsonschema.validate(json.loads(deltas[0]["arguments"]), WEATHER)
    several = await sdk.chat.completions.create(model="", messages=ASK, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=True, max_tokens=90)
    assert_valid_calls(several.choices[0].message.tool_calls)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_auto_none_and_a_tool_result_round_trip(sdk):
    auto = await sdk.chat.completions.create(model="", messages=ASK, tools=TOOLS, max_tokens=40)
    message = auto.choices[0].message
    if message.tool_calls:  # the model chose to call
        assert auto.choices[0].finish_reason == "tool_calls"
        assert_valid_calls(message.tool_calls)
    else:
        assert isinstance(message.content, str)
    none = await sdk.chat.completions.create(model="", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    followed = await sdk.chat.completions.create(
        model="", tools=TOOLS, max_tokens=16, tool_choice="none",
        messages=[*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}])
    assert followed.choices[0].message.content and followed.usage.prompt_tokens > none.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model="", messages=ASK, tools=TOOLS, max_tokens=8,
                                          tool_choice={"type": "function", "function": {"name": "nope"}})
    assert refused.value.body["param"] == "tool_choice"


def test_rendering_without_template_support_writes_a_preamble_and_tagged_calls():
    tools = (Tool("get_time", "Time in a zone", json.dumps(TIME)),)
    messages = [ChatMessage("user", "time?"), ChatMessage("assistant", "", (ToolCall("get_time", '{"zone": "UTC"}'),)),
                ChatMessage("tool", "12:00", tool_call_id="call_1")]
    rendered = conversation(messages, tools, native=False)
    assert rendered[0]["role"] == "system" and "get_time" in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    assert rendered[3] == {"role": "tool", "content": "12:00", "tool_call_id": "call_1"}
    native = conversation(messages, tools, native=True)
    assert native[1]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": {"zone": "UTC"}}
    assert template_knows_tools("{% if tools %}x{% endif %}") and not template_knows_tools("{{ messages }}")


def test_parsing_tagged_bare_and_unknown_calls():
    tools = (Tool("get_time", "", json.dumps(TIME)),)
    tagged = parse_reply('Sure. <tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>', tools)
    assert tagged.content == "Sure." and tagged.calls == (ToolCall("get_time", '{"zone": "CET"}'),)
    bare = parse_reply('[{"name": "get_time", "arguments": {"zone": "JST"}}]', tools)
    assert bare.content == "" and bare.calls[0].arguments == '{"zone": "JST"}'
    assert parse_reply('{"name": "other", "arguments": {}}', tools).calls == ()
    assert json.loads(call_constraint(tools, parallel=True).value)["type"] == "array"
