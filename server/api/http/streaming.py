"""The n choices of one answer together: collected whole (unary) or merged into one server-sent event
stream, each choice's pieces as they come; a client that goes away closes every choice."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from loraplex.server.api.http.openai_request import Answer
from loraplex.server.api.http.openai_response import error_body, render_choice, served_by, usage
from loraplex.server.api.http.stops import Piece
from loraplex.server.core.errors import RequestError

log = logging.getLogger(__name__)


async def rest(first: Piece, choice: AsyncIterator[Piece]) -> list[Piece]:
    """Every piece of one choice, `first` included; the choice is closed also if the client goes away."""
    pieces = [first]
    try:
        async for piece in choice:
            pieces.append(piece)
    finally:
        await choice.aclose()
    return pieces


async def whole(choice: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    """One choice as a single piece, when it ends (a streamed reply that may be a tool call)."""
    first = await anext(choice)
    yield joined(await rest(first, choice))


def joined(pieces: Sequence[Piece]) -> Piece:
    """One choice's pieces as one: their text and tokens, with the last one's finish and counts."""
    return replace(pieces[-1], text="".join(p.text for p in pieces), tokens=tuple(t for p in pieces for t in p.tokens))


async def events(answer: Answer, firsts: list[Piece], choices: list[AsyncIterator[Piece]], ident: str,
                  created: int) -> AsyncIterator[str]:
    """The SSE frames of one streamed answer (each choice's role first for chat), then the usage chunk if
    asked, then [DONE]."""
    kind = "chat.completion.chunk" if answer.chat else "text_completion"
    lasts = list(firsts)
    offsets = [0] * len(choices)

    def frame(payload: dict) -> str:
        header = {"id": ident, "object": kind, "created": created, "model": answer.model}
        return f"data: {json.dumps({**header, **payload})}\n\n"

    def chunk(index: int, piece: Piece) -> str:
        lasts[index] = piece
        rendered = render_choice(answer, index, piece, final=False, offset=offsets[index])
        offsets[index] += len(piece.text)
        return frame({"choices": [rendered], **served_by(piece)})

    try:
        if answer.chat:
            for index in range(len(choices)):
                yield frame({"choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
        for index, first in enumerate(firsts):
            yield chunk(index, first)
        async for index, piece in _merged([choice for choice, first in zip(choices, firsts, strict=True)
                                           if first.finish_reason is None],
                                          [i for i, first in enumerate(firsts) if first.finish_reason is None]):
            yield chunk(index, piece)
    except Exception as error:  # the status line is sent: the failure is the last event (no [DONE])
        if not isinstance(error, RequestError):
            log.error("streamed answer failed", exc_info=error)
        yield f"data: {json.dumps(error_body(error)[1])}\n\n"
        return
    finally:  # a client that disconnects mid-stream frees its sequences
        await asyncio.gather(*(choice.aclose() for choice in choices), return_exceptions=True)
    if answer.include_usage:
        yield frame({"choices": [], "usage": usage(lasts)})
    yield "data: [DONE]\n\n"


async def _merged(choices: list[AsyncIterator[Piece]], indices: list[int]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) as each choice produces them; one choice is iterated directly (no tasks)."""
    if len(choices) == 1:
        async for piece in choices[0]:
            yield indices[0], piece
        return
    queue: asyncio.Queue[tuple[int, Piece | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, choice: AsyncIterator[Piece]) -> None:
        try:
            async for piece in choice:
                await queue.put((index, piece))
            await queue.put((index, None))
        except BaseException as error:  # re-raised by the consumer (cancellation included)
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(index, choice)) for index, choice in zip(indices, choices, strict=True)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
