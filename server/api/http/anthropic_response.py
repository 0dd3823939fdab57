"""Anthropic's Messages API answers: the reply's content blocks (text, tool_use), its stop reason, usage, the
whole message of a unary answer, and refusals as `{"type": "error", "error": {"type", "message"}}` with the
status the OpenAI routes give the same refusal."""

from __future__ import annotations

import json
import uuid

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from loraplex.server.api.http.anthropic_request import MessagesAnswer
from loraplex.server.api.http.openai_response import HTTP_ERRORS, retry_after, served_by
from loraplex.server.api.http.stops import Piece
from loraplex.server.core.calls import GeneratedToken
from loraplex.server.core.errors import RequestError
from loraplex.server.core.tools import parse_reply

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}
"""Piece.finish_reason -> Anthropic's stop_reason (a stop string gives "stop_sequence", a tool call "tool_use")."""
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error"}
"""HTTP status -> Anthropic's error type."""


def content_blocks(answer: MessagesAnswer, piece: Piece) -> tuple[list[dict], str, str | None]:
    """(content blocks, stop_reason, stop_sequence) of a whole reply: with tools, the calls parsed from it
    become tool_use blocks after the text around them (stop_reason "tool_use"); else one text block."""
    if answer.tool_use.parse:
        reply = parse_reply(piece.text, answer.tool_use.tools)
        if reply.calls:
            uses = [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name,
                     "input": json.loads(call.arguments)} for call in reply.calls]
            return [*([text_block(reply.content)] if reply.content else []), *uses], "tool_use", None
    return [text_block(piece.text)], *stop_reason(piece)


def text_block(text: str) -> dict:
    return {"type": "text", "text": text}


def stop_reason(piece: Piece) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a choice's last piece."""
    if piece.stop_string is not None:
        return "stop_sequence", piece.stop_string
    return STOP_REASONS[piece.finish_reason], None


def input_usage(first: GeneratedToken) -> dict[str, int]:
    """The prompt's share of Anthropic's usage, from a generation's first token: `input_tokens` are the prompt
    tokens the prefix cache did not hold, `cache_read_input_tokens` those it held (their sum is the prompt)."""
    return {"input_tokens": first.prompt_tokens - first.cached_tokens,
            "cache_read_input_tokens": first.cached_tokens}


def message(answer: MessagesAnswer, ident: str, content: list[dict], reason: str | None, sequence: str | None,
            usage: dict[str, int]) -> dict:
    """A Messages `message` object (the unary answer; message_start's with empty content and no reason)."""
    return {"id": ident, "type": "message", "role": "assistant", "model": answer.model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage}


def whole_message(answer: MessagesAnswer, ident: str, reply: Piece) -> dict:
    """The unary answer to a Messages request from its whole reply, with loraplex's `adapter_version`."""
    content, reason, sequence = content_blocks(answer, reply)
    usage = {**input_usage(reply.tokens[0]), "output_tokens": reply.completion_tokens}
    return {**message(answer, ident, content, reason, sequence, usage), **served_by(reply)}


def error_body(error: Exception) -> tuple[int, dict]:
    """(HTTP status, Anthropic error object) of a refusal; anything else is 500 without details (the log has
    them)."""
    status = HTTP_ERRORS[type(error)][0] if type(error) in HTTP_ERRORS else 500
    text = str(error) if isinstance(error, RequestError) else "internal error (see the server log)"
    return status, {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": text}}


async def error_response(request: HttpRequest, error: Exception) -> Response:
    """The refusal's JSON; an Overloaded one (429) also says when to retry."""
    status, body = error_body(error)
    return JSONResponse(body, status, retry_after(error))
