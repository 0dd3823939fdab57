"""Stop strings: one choice's tokens turned into pieces of text, cut at the first stop string.

A stop string is matched on the decoded text, so text that may be the start of one is held back until
it is known not to be (at most the longest stop string less one character); meeting one ends the
generation as finished (StopGeneration is thrown into the token stream).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from loraplex.server.core.calls import GeneratedToken, StopGeneration
from loraplex.server.core.errors import InvalidRequest


@dataclass(frozen=True)
class Piece:
    """One step of one choice: the text it adds and the tokens behind it; the last one has the finish
    reason and the choice's token counts."""

    text: str
    tokens: tuple[GeneratedToken, ...]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Of prompt_tokens, those the prefix cache held."""
    stop_string: str | None = None
    """The stop string that ended the choice (on its last piece); None when the model or a limit ended it."""


async def pieces(tokens: AsyncIterator[GeneratedToken], stops: tuple[str, ...], names: Mapping[str, str],
                 ) -> AsyncIterator[Piece]:
    """One choice's pieces: its text as it comes, cut at the first stop string (held back while one may
    still be forming); the last piece finishes. Refusals name their field as `names` renames it."""
    held, held_tokens, generated, holdback = "", [], 0, max(map(len, stops), default=1) - 1
    first: GeneratedToken | None = None  # it carries the prompt's token counts
    try:
        async for token in tokens:
            generated += 1
            first = first or token
            held += token.text
            held_tokens.append(token)
            cut, stop = min(((i, stop) for stop in stops if (i := held.find(stop)) >= 0), default=(-1, None))
            if cut >= 0 and token.completion is None:  # the generation ends here, as finished
                with contextlib.suppress(StopAsyncIteration):
                    await tokens.athrow(StopGeneration())
            if cut >= 0 or token.completion is not None:
                reason = "stop" if cut >= 0 else token.completion.finish_reason.value  # OpenAI's names
                yield Piece(held[:cut] if cut >= 0 else held, tuple(held_tokens), reason, first.prompt_tokens,
                            generated, first.cached_tokens, stop)
                return
            if not stops:  # one piece per token, as gRPC streams (its text may be empty)
                yield Piece(held, tuple(held_tokens))
                held, held_tokens = "", []
            elif len(held) > holdback:
                emit, held = held[:len(held) - holdback], held[len(held) - holdback:]
                yield Piece(emit, tuple(held_tokens))
                held_tokens = []
    except InvalidRequest as error:
        raise error.renamed(names) from None
    finally:  # done, stopped by a stop string, or the client went away: free the sequence
        await tokens.aclose()
