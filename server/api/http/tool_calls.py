"""OpenAI's tool calling on /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls` and the
messages that carry calls and results, decoded; replies rendered with `tool_calls`.

tool_choice "none" renders no tools; "auto" (the default with tools) renders them and generates freely, a
reply holding <tool_call> blocks of known tools becomes tool_calls; "required" and a named function
({"type": "function", "function": {"name": ...}}) also constrain the output to such a call, its arguments
valid against the function's schema (core/tools.py call_constraint; parallel_tool_calls true allows several
calls under "required"). Such replies finish with "tool_calls". Streamed, a choice whose reply may be a call
is sent whole when it ends (its deltas: the content, or the tool_calls with their full arguments).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from loraplex.server.core.calls import ChatMessage, Constraint, Tool, ToolCall
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.tools import call_constraint, parse_reply


@dataclass(frozen=True)
class ToolUse:
    """A chat body's tools and how the reply may use them."""

    tools: tuple[Tool, ...]
    """The tools rendered into the prompt (none with tool_choice "none")."""
    parse: bool
    """Whether replies are parsed for calls."""
    constraint: Constraint | None
    """Forces a call ("required" or a named function); None otherwise."""


NO_TOOLS = ToolUse((), False, None)


def decode_tools(body: dict) -> ToolUse:
    """The body's `tools`, `tool_choice` and `parallel_tool_calls` (refusals name the field)."""
    raw = body.get("tools")
    choice = body.get("tool_choice")
    if raw is None:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice", "needs tools")
        return NO_TOOLS
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("tools", "must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    tools = tuple(_tool(entry) for entry in raw)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls", "must be true or false")
    if choice in (None, "auto"):
        return ToolUse(tools, True, None)
    if choice == "none":
        return NO_TOOLS
    if choice == "required":
        return ToolUse(tools, True, call_constraint(tools, parallel))
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    named = [t for t in tools if t.name == name]
    if not named:
        raise InvalidRequest("tool_choice", '"none", "auto", "required" or {"type": "function", "function": '
                             '{"name": ...}} naming one of the tools')
    return ToolUse(tools, True, call_constraint(named, parallel=False))


def _tool(entry: object) -> Tool:
    function = entry.get("function") if isinstance(entry, dict) and entry.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise InvalidRequest("tools", "each tool must be {\"type\": \"function\", \"function\": {\"name\", ...}}")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    description = function.get("description", "")
    if not isinstance(parameters, dict) or not isinstance(description, str):
        raise InvalidRequest("tools", f"{function['name']}: parameters must be a JSON schema object, "
                             "description a string")
    return Tool(function["name"], description, json.dumps(parameters))


def decode_message(message: object) -> ChatMessage:
    """One chat message: {role, content} with string content; an assistant's may carry `tool_calls` (and
    null content), a "tool" message its `tool_call_id`."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise InvalidRequest("messages", "must be a list of {role, content} with string content")
    content, calls = message.get("content"), message.get("tool_calls") or []
    if not isinstance(content, str) and not (content is None and calls):
        raise InvalidRequest("messages", "must be a list of {role, content} with string content")
    if not isinstance(calls, list):
        raise InvalidRequest("messages", "tool_calls must be a list")
    call_id = message.get("tool_call_id")
    if call_id is not None and not isinstance(call_id, str):
        raise InvalidRequest("messages", "tool_call_id must be a string")
    return ChatMessage(message["role"], content or "", tuple(_call(c) for c in calls), call_id)


def _call(call: object) -> ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    try:
        valid = isinstance(function.get("name"), str) and isinstance(json.loads(arguments), dict)
    except (AttributeError, TypeError, json.JSONDecodeError):
        valid = False
    if not valid:
        raise InvalidRequest("messages", "each tool call must be {\"function\": {\"name\", \"arguments\": JSON "
                             "object text}}")
    return ToolCall(function["name"], arguments)


def rendered_reply(text: str, tools: tuple[Tool, ...], finish_reason: str | None,
                   ) -> tuple[dict, str | None]:
    """(the assistant message's content and tool_calls fields, finish_reason): the calls parsed from `text`
    (finish_reason "tool_calls" then), else the text as content."""
    reply = parse_reply(text, tools)
    if not reply.calls:
        return {"content": text}, finish_reason
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": call.name, "arguments": call.arguments}} for call in reply.calls]
    return {"content": reply.content or None, "tool_calls": calls}, "tool_calls"
