"""Tool calling: tools rendered into the conversation, the constraint that forces a call, and calls parsed
back out of the generated text.

A model whose chat template knows tools (it reads a `tools` variable) gets them through the template, with
assistant `tool_calls` and `tool` messages as the template renders them. A template without tool support
(SmolLM2's) gets a system preamble (TOOLS_PREAMBLE: the functions as JSON and how to call one), assistant
calls written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and tool results as messages
of role "tool". Either way, a call is such a JSON object, wrapped in <tool_call> tags (free generation) or
bare (when `call_constraint` forces it: the arguments then follow the function's JSON schema).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from loraplex.server.core.calls import ChatMessage, Constraint, Tool, ToolCall

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOLS_PREAMBLE = (
    "You can call these functions (JSON schemas of their arguments):\n{functions}\n"
    "To call one, answer with <tool_call>{{\"name\": NAME, \"arguments\": ARGUMENTS}}</tool_call> and nothing "
    "else; a function's result comes back in a message of role \"tool\"."
)


def template_knows_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders tools itself (it reads the `tools` variable)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def conversation(messages: Sequence[ChatMessage], tools: Sequence[Tool], native: bool) -> list[dict]:
    """The messages as apply_chat_template takes them. `native` (template_knows_tools): assistant calls as
    `tool_calls` and the template renders the tools; else the TOOLS_PREAMBLE opens (or joins) the system
    message and calls are written out as <tool_call> text."""
    rendered = []
    for message in messages:
        entry: dict = {"role": message.role, "content": message.content}
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls and native:
            entry["tool_calls"] = [{"type": "function", "function": {"name": c.name,
                                                                     "arguments": json.loads(c.arguments)}}
                                   for c in message.tool_calls]
        elif message.tool_calls:
            entry["content"] = (message.content + "".join(f"<tool_call>{call_json(c)}</tool_call>"
                                                          for c in message.tool_calls)).strip()
        rendered.append(entry)
    if tools and not native:
        preamble = TOOLS_PREAMBLE.format(functions="\n".join(json.dumps(function_spec(t)) for t in tools))
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + preamble}
        else:
            rendered.insert(0, {"role": "system", "content": preamble})
    return rendered


def function_spec(tool: Tool) -> dict:
    """A tool as OpenAI's {"type": "function", "function": {...}} (what templates and the preamble show)."""
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": json.loads(tool.parameters)}}


def call_json(call: ToolCall) -> str:
    return json.dumps({"name": call.name, "arguments": json.loads(call.arguments)})


def call_constraint(tools: Sequence[Tool], parallel: bool) -> Constraint:
    """The output must be a call of one of `tools` ({"name": ..., "arguments": ...}, the arguments valid for
    that function's schema); `parallel`: a JSON array of one or more such calls."""
    calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {"type": "array", "items": one, "minItems": 1} if parallel else one
    return Constraint("json_schema", json.dumps(schema))


@dataclass(frozen=True)
class ParsedReply:
    """A generated reply split into its text and its tool calls (arguments as JSON text)."""

    content: str
    calls: tuple[ToolCall, ...]


def parse_reply(text: str, tools: Sequence[Tool]) -> ParsedReply:
    """The calls in `text`: <tool_call> blocks, or the whole text as one call or an array of calls (a forced
    call); only well-formed calls of known tools count, the rest stays text."""
    names = {t.name for t in tools}
    found: list[ToolCall] = []
    blocks = TOOL_CALL.findall(text)
    candidates = blocks if blocks else [text.strip()]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and item.get("name") in names and isinstance(item.get("arguments"), dict):
                found.append(ToolCall(item["name"], json.dumps(item["arguments"])))
    if not found:
        return ParsedReply(text, ())
    return ParsedReply(TOOL_CALL.sub("", text).strip() if blocks else "", tuple(found))
