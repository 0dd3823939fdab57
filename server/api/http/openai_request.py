"""The OpenAI protocol's requests: a completions or chat body decoded into one GenerateCall per choice
(`n`) and the answer's wire options; every refusal names the body's field (`param`).

Decoding checks the body's shape (each field's JSON type, integers within what GenerateRequest carries)
and the options only HTTP has (n, stop, stream_options, top_logprobs needing logprobs); the request itself
(an empty prompt, max_tokens, the sampling fields' bounds) is checked by the core
(server/core/validation.py), whose refusals name GenerateCall's fields, renamed to the body's by
`Answer.params`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

from loraplex.server.api.http.fields import flag, integer, number, optional_int
from loraplex.server.api.http.tool_calls import NO_TOOLS, ToolUse, decode_message, decode_tools
from loraplex.server.core.calls import ChatMessage, Constraint, GenerateCall
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.engine import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
COMPLETIONS_PARAMS = {"adapter": "model", "max_new_tokens": "max_tokens"}
"""GenerateCall's field names as a completions body spells them (in errors' `param`)."""
CHAT_PARAMS = {**COMPLETIONS_PARAMS, "prompt": "messages"}
"""GenerateCall's field names as a chat body spells them (in errors' `param`)."""
ADMIN_PARAMS = {"name": "lora_name", "source": "lora_path"}
"""The admin calls' field names as vLLM's load/unload bodies spell them."""
GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "grammar"}
"""vLLM's extra body fields -> the Constraint kind each asks for (guided_json: a schema object or its JSON text)."""
SERVICE_TIERS = {"auto": None, "default": None, "priority": "interactive", "flex": "batch"}
"""OpenAI's service_tier -> GenerateCall.priority: "flex" (slower, cheaper) is the batch class, "priority" asks
for interactive; unset, "auto" and "default" take the tenant's class."""


@dataclass(frozen=True)
class Answer:
    """How one request is answered: the call of each choice and the wire options around it."""

    calls: list[GenerateCall]
    params: Mapping[str, str]
    """GenerateCall's field names as the body spells them, for the core's refusals."""
    stops: tuple[str, ...]
    chat: bool
    model: str
    stream: bool
    include_usage: bool
    echo: bool = False
    """Completions' `echo`: each choice starts with its prompt (and, with logprobs, the prompt's logprobs)."""
    prompt_only: bool = False
    """`echo` with max_tokens 0: the prompt alone (one token is generated and dropped)."""
    tool_use: ToolUse = NO_TOOLS
    """Chat's tools and tool_choice (tool_calls.py)."""


def decode_completions(body: dict) -> Answer:
    """The Answer to a POST /v1/completions body: `n` choices per prompt (a string, token ids, or a list of
    either), in prompt order. `echo` starts each choice with its prompt; with `logprobs`, the prompt tokens'
    logprobs come first in the choice's logprobs (the first prompt token's is null), computed in prefill;
    `max_tokens` 0 is allowed with `echo` (the prompt alone)."""
    prompts = _prompts(body.get("prompt"))
    top = optional_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    echo = flag(body, "echo")
    prompt_only = echo and body.get("max_tokens") == 0
    if prompt_only:
        body = {**body, "max_tokens": 1}
    answers = [_decode(body, prompt, COMPLETIONS_PARAMS, chat=False, logprobs=top is not None, top_logprobs=top or 0)
               for prompt in prompts]
    calls = [replace(call, prompt_logprobs=echo and (top is not None or not isinstance(call.prompt, str)))
             for answer in answers for call in answer.calls]
    return replace(answers[0], calls=calls, echo=echo, prompt_only=prompt_only)


def _prompts(prompt: object) -> list[str | list[int]]:
    """A completions body's prompts: a string, token ids, or a non-empty list of either."""
    def token_ids(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str) or (token_ids(prompt) and prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or token_ids(p) for p in prompt):
        return list(prompt)
    raise InvalidRequest("prompt", "must be a string, a list of token ids, or a list of either")


def decode_chat(body: dict) -> Answer:
    """The Answer to a POST /v1/chat/completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages", "must be a list of {role, content} with string content")
    prompt: list[ChatMessage] = [decode_message(m) for m in messages]
    logprobs = flag(body, "logprobs")
    top = optional_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise InvalidRequest("top_logprobs", "needs logprobs: true")
    tool_use = decode_tools(body)
    answer = _decode(body, prompt, CHAT_PARAMS, chat=True, logprobs=logprobs, top_logprobs=top or 0)
    if tool_use.constraint is not None and answer.calls[0].constraint is not None:
        raise InvalidRequest("tool_choice", "a forced tool call cannot take response_format or guided_* too")
    calls = [replace(call, tools=tool_use.tools, constraint=tool_use.constraint or call.constraint)
             for call in answer.calls]
    return replace(answer, calls=calls, tool_use=tool_use)


def _decode(body: dict, prompt: str | list[int] | list[ChatMessage], params: Mapping[str, str], chat: bool,
            logprobs: bool, top_logprobs: int) -> Answer:
    """The body's GenerateCall for each of its `n` choices and the answer's wire options."""
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidRequest("model", "must be a string")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = {"temperature": number(body, "temperature", 1.0), "top_p": number(body, "top_p", 1.0),
                "presence_penalty": number(body, "presence_penalty", 0.0),
                "frequency_penalty": number(body, "frequency_penalty", 0.0)}
    seed = optional_int(body, "seed", -(2**63), 2**64 - 1)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
    if (stop is not None and not isinstance(stop, str | list)) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"must be a non-empty string or a list of up to {MAX_STOP_STRINGS}")
    n = optional_int(body, "n", 1, MAX_CHOICES) or 1
    cache_salt = "" if body.get("cache_salt") is None else body["cache_salt"]  # vLLM's field
    if not isinstance(cache_salt, str):
        raise InvalidRequest("cache_salt", "must be a string")
    tier = body.get("service_tier") or "auto"
    if not isinstance(tier, str) or tier not in SERVICE_TIERS:
        raise InvalidRequest("service_tier", f"must be one of {', '.join(map(repr, SERVICE_TIERS))}")
    constraint, constraint_param = _constraint(body)
    call = GenerateCall(adapter=model, prompt=prompt, max_new_tokens=None if max_tokens is None else
                        integer(max_tokens, "max_tokens"), sampling=sampling, ignore_eos=flag(body, "ignore_eos"),
                        logprobs=logprobs, top_logprobs=top_logprobs, cache_salt=cache_salt,
                        priority=SERVICE_TIERS[tier], constraint=constraint)
    calls = [replace(call, sampling={**sampling, "seed": (seed + i) % 2**64}) if seed is not None else call
             for i in range(n)]
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise InvalidRequest("stream_options", "must be an object")
    return Answer(calls, {**params, "constraint": constraint_param}, stops, chat, model, flag(body, "stream"),
                  flag(stream_options, "include_usage"))


def _constraint(body: dict) -> tuple[Constraint | None, str]:
    """The body's structured-output constraint and the field that set it: OpenAI's `response_format`
    ({"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}: the output follows the schema whether or not `strict` is set) or one of vLLM's GUIDED_FIELDS;
    at most one. Whether it compiles is the core's check (field "constraint", renamed to this field)."""
    given = [name for name in ("response_format", *GUIDED_FIELDS) if body.get(name) is not None]
    if len(given) > 1:
        raise InvalidRequest(given[1], f"set only one of {', '.join(given)}")
    if not given:
        return None, "response_format"
    name, value = given[0], body[given[0]]
    if name == "guided_json" and isinstance(value, dict):
        return Constraint("json_schema", json.dumps(value)), name
    if name in GUIDED_FIELDS:
        if not isinstance(value, str) or not value:
            raise InvalidRequest(name, "must be a non-empty string" + (" or a JSON schema object"
                                                                       if name == "guided_json" else ""))
        return Constraint(GUIDED_FIELDS[name], value), name
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None, name
    if kind == "json_object":
        return Constraint("json_object"), name
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidRequest(name, "json_schema needs {\"name\", \"schema\": {...}}")
        return Constraint("json_schema", json.dumps(spec["schema"])), name
    raise InvalidRequest(name, 'type must be "text", "json_object" or "json_schema"')
