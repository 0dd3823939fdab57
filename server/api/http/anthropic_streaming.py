"""A streamed Messages answer as Anthropic's server-sent events: message_start, then per content block
content_block_start, its deltas and content_block_stop (a ping after the first start), then message_delta
(stop_reason, stop_sequence, output_tokens) and message_stop.

Text streams as it comes: one text block, a text_delta per piece. A reply that may be a tool call
(`tool_use.parse`) comes whole when it ends (the choice is tool_calls.whole's): its text block with one
text_delta, then each tool_use block with its input as one input_json_delta. A failure after the status line
is sent ends the stream with an `error` event (no message_stop)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from loraplex.server.api.http.anthropic_request import MessagesAnswer
from loraplex.server.api.http.anthropic_response import content_blocks, error_body, input_usage, message, stop_reason
from loraplex.server.api.http.stops import Piece
from loraplex.server.core.errors import RequestError

log = logging.getLogger(__name__)


def event(payload: dict) -> str:
    """One server-sent event, named by its payload's type."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"


async def message_events(answer: MessagesAnswer, first: Piece, choice: AsyncIterator[Piece],
                         ident: str) -> AsyncIterator[str]:
    """The events of one streamed answer whose first piece (`first`) is already generated; the choice is
    closed when the stream ends, also when the client goes away."""
    try:
        yield event({"type": "message_start", "message": message(answer, ident, [], None, None, {
            **input_usage(first.tokens[0]), "output_tokens": 0})})
        if answer.tool_use.parse:
            last = first
            blocks, reason, sequence = content_blocks(answer, first)
            for index, block in enumerate(blocks):
                for payload in _block_events(index, block):
                    yield event(payload)
        else:
            yield event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
            yield event({"type": "ping"})
            last = first
            if first.text:
                yield event(_text_delta(first.text))
            if first.finish_reason is None:
                async for last in choice:  # the last piece ends the message
                    if last.text:
                        yield event(_text_delta(last.text))
            yield event({"type": "content_block_stop", "index": 0})
            reason, sequence = stop_reason(last)
    except Exception as error:  # the status line is sent: the failure is the last event
        if not isinstance(error, RequestError):
            log.error("streamed message failed", exc_info=error)
        yield event(error_body(error)[1])
        return
    finally:  # a client that disconnects mid-stream frees its sequence
        await choice.aclose()
    yield event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                 "usage": {"output_tokens": last.completion_tokens}})
    yield event({"type": "message_stop"})


def _text_delta(text: str) -> dict:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def _block_events(index: int, block: dict) -> list[dict]:
    """A whole content block's start, its one delta and its stop."""
    if block["type"] == "text":
        start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
    else:
        start = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
    return [{"type": "content_block_start", "index": index, "content_block": start},
            {"type": "content_block_delta", "index": index, "delta": delta},
            {"type": "content_block_stop", "index": index}]
