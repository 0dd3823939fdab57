"""Anthropic's Messages API requests: a POST /v1/messages body decoded into one GenerateCall (a conversation)
and the answer's wire options; every refusal names the body's field.

Read: `model` (the base's name, "" or an adapter, as on the OpenAI routes), `max_tokens` (required),
`system` (a string or text blocks), `messages` ({role: "user" | "assistant", content: a string or blocks}:
text blocks, an assistant's tool_use blocks, a user's tool_result blocks; several text blocks of one message
are joined by newlines), `temperature`, `top_p`, `top_k`, `stop_sequences`, `stream`, `tools` and
`tool_choice`; and loraplex's `seed` (an extra body field: seeded sampling, as on the OpenAI routes). Other
fields (metadata, ...) are ignored. The sampling fields' bounds and max_tokens' limit are the core's checks
(server/core/validation.py), whose refusals name GenerateCall's fields, renamed by `MessagesAnswer.params`.

Tool use maps onto the core's tool machinery (core/tools.py), as OpenAI's tools do (tool_calls.py): a
tool_use block is an assistant ToolCall, a tool_result block a message of role "tool"; tool_choice "auto"
renders the tools and parses the reply, "any" and {"type": "tool", "name"} also force a call (arguments valid
for the tool's input_schema; "any" allows several unless disable_parallel_tool_use), "none" renders none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from loraplex.server.api.http.fields import flag, integer, number, optional_int
from loraplex.server.api.http.openai_request import MAX_STOP_STRINGS
from loraplex.server.api.http.tool_calls import NO_TOOLS, ToolUse
from loraplex.server.core.calls import ChatMessage, GenerateCall, Tool, ToolCall
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.tools import call_constraint

MESSAGES_PARAMS = {"adapter": "model", "max_new_tokens": "max_tokens", "prompt": "messages",
                   "constraint": "tool_choice"}
"""GenerateCall's field names as a Messages body spells them (in refusals)."""
ROLES = ("user", "assistant")
TOOL_CHOICES = ("auto", "any", "tool", "none")


@dataclass(frozen=True)
class MessagesAnswer:
    """How one Messages request is answered: its call and the wire options around it."""

    call: GenerateCall
    params: Mapping[str, str]
    """GenerateCall's field names as the body spells them, for the core's refusals."""
    stops: tuple[str, ...]
    """stop_sequences, matched on the decoded text."""
    model: str
    stream: bool
    tool_use: ToolUse


def decode_messages(body: dict) -> MessagesAnswer:
    """The MessagesAnswer to a POST /v1/messages body."""
    model = body.get("model")
    if not isinstance(model, str):
        raise InvalidRequest("model", "is required: the base model's name (or \"\") or an adapter's")
    if body.get("max_tokens") is None:
        raise InvalidRequest("max_tokens", "is required")
    sampling: dict[str, float | int] = {"temperature": number(body, "temperature", 1.0),
                                        "top_p": number(body, "top_p", 1.0)}
    if body.get("top_k") is not None:
        sampling["top_k"] = integer(body["top_k"], "top_k")
    seed = optional_int(body, "seed", -(2**63), 2**64 - 1)
    if seed is not None:
        sampling["seed"] = seed % 2**64
    tool_use = _tool_use(body)
    call = GenerateCall(adapter=model, prompt=_conversation(body), max_new_tokens=integer(body["max_tokens"],
                        "max_tokens"), sampling=sampling, tools=tool_use.tools, constraint=tool_use.constraint)
    return MessagesAnswer(call, MESSAGES_PARAMS, _stop_sequences(body), model, flag(body, "stream"), tool_use)


def _stop_sequences(body: dict) -> tuple[str, ...]:
    stops = body.get("stop_sequences")
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop_sequences", f"must be a list of up to {MAX_STOP_STRINGS} non-empty strings")
    return tuple(stops)


def _conversation(body: dict) -> list[ChatMessage]:
    """`system` (a system message first) and `messages`, as the chat template takes them."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of {role, content}")
    conversation = [decoded for message in messages for decoded in _message(message)]
    if messages[-1].get("role") != "user":
        raise InvalidRequest("messages", "the last message must be the user's (continuing a prefilled "
                             "assistant turn is not supported)")
    system = body.get("system")
    if system is None:
        return conversation
    return [ChatMessage("system", _text(system, "system")), *conversation]


def _message(message: object) -> list[ChatMessage]:
    """One Messages message as ChatMessages: a user's tool_result blocks become "tool" messages (in their
    order, before the user's text, if any); an assistant's tool_use blocks become its tool calls."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ROLES:
        raise InvalidRequest("messages", f"each message must be {{role, content}} with role {' or '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, str):
        return [ChatMessage(role, content)]
    if not isinstance(content, list) or not content:
        raise InvalidRequest("messages", "content must be a string or a non-empty list of content blocks")
    texts, calls, results = [], [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_block(block, "messages"))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_call(block))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block))
        else:
            raise InvalidRequest("messages", f"a {role} message's content block of type {kind!r} is not supported; "
                                 "send text" + (", tool_use" if role == "assistant" else ", tool_result") + " blocks")
    if role == "assistant":
        return [ChatMessage(role, "\n".join(texts), tuple(calls))]
    return [*results, *([ChatMessage(role, "\n".join(texts))] if texts else [])]


def _text(value: object, field: str) -> str:
    """A string, or a non-empty list of text blocks joined by newlines (system, tool_result content)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        return "\n".join(_text_block(block, field) for block in value)
    raise InvalidRequest(field, "must be a string or a non-empty list of text blocks")


def _text_block(block: object, field: str) -> str:
    text = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
    if not isinstance(text, str):
        raise InvalidRequest(field, 'a text block must be {"type": "text", "text": "..."}')
    return text


def _tool_call(block: dict) -> ToolCall:
    name, arguments = block.get("name"), block.get("input")
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        raise InvalidRequest("messages", 'a tool_use block must be {"type": "tool_use", "id", "name", '
                             '"input": {...}}')
    return ToolCall(name, json.dumps(arguments))


def _tool_result(block: dict) -> ChatMessage:
    """A tool_result block as a "tool" message; `is_error` results start with "Error: "."""
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest("messages", "a tool_result block needs the tool_use_id it answers")
    content = block.get("content", "")
    text = content if content == "" else _text(content, "messages")
    return ChatMessage("tool", f"Error: {text}" if flag(block, "is_error") else text, tool_call_id=call_id)


def _tool_use(body: dict) -> ToolUse:
    """`tools` and `tool_choice` (see the module's docstring)."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if choice is not None and kind not in TOOL_CHOICES:
        raise InvalidRequest("tool_choice", f"must be {{\"type\": ...}} with type one of {', '.join(TOOL_CHOICES)}")
    if raw is None or raw == []:
        if kind not in (None, "none"):
            raise InvalidRequest("tool_choice", "needs tools")
        return NO_TOOLS
    if not isinstance(raw, list):
        raise InvalidRequest("tools", 'must be a list of {"name", "description", "input_schema": {...}}')
    tools = tuple(_tool(entry) for entry in raw)
    parallel = not flag(choice or {}, "disable_parallel_tool_use")
    if kind in (None, "auto"):
        return ToolUse(tools, True, None)
    if kind == "none":
        return NO_TOOLS
    if kind == "any":
        return ToolUse(tools, True, call_constraint(tools, parallel))
    named = [tool for tool in tools if tool.name == choice.get("name")]
    if not named:
        raise InvalidRequest("tool_choice", '{"type": "tool", "name": ...} must name one of the tools')
    return ToolUse(tools, True, call_constraint(named, parallel=False))


def _tool(entry: object) -> Tool:
    """A client tool {name, description, input_schema}; server tools (with another `type`) are refused."""
    if not isinstance(entry, dict) or entry.get("type", "custom") != "custom":
        raise InvalidRequest("tools", 'each tool must be a client tool {"name", "description", "input_schema"} '
                             "(server tools are not supported)")
    name, description, schema = entry.get("name"), entry.get("description", ""), entry.get("input_schema")
    if not isinstance(name, str) or not name or not isinstance(description, str) or not isinstance(schema, dict):
        raise InvalidRequest("tools", 'each tool must be {"name": "...", "description": "...", '
                             '"input_schema": {JSON schema object}}')
    return Tool(name, description, json.dumps(schema))
