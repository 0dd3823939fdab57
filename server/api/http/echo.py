"""Completions' `echo`: a choice's pieces with its prompt in front (text, and tokens with logprobs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from loraplex.server.api.http.stops import Piece


async def echoed(choice: AsyncIterator[Piece], prompt_text: str | None, prompt_only: bool) -> AsyncIterator[Piece]:
    """`choice` with its prompt first: the first piece's text starts with `prompt_text` (None: the prompt
    tokens' pieces joined, for token-id prompts) and its tokens with the prompt's tokens when the core
    reported them (GeneratedToken.prompt_logprobs: the first has logprob None). `prompt_only` (max_tokens 0):
    the one generated token is dropped and the prompt alone finishes, with "length" and 0 completion tokens."""
    try:
        first = await anext(choice)
        prompt_tokens = first.tokens[0].prompt_logprobs or ()
        text = prompt_text if prompt_text is not None else "".join(token.piece for token in prompt_tokens)
        if prompt_only:
            yield Piece(text, tuple(prompt_tokens), "length", first.prompt_tokens, 0, first.cached_tokens)
            return
        yield replace(first, text=text + first.text, tokens=(*prompt_tokens, *first.tokens))
        async for piece in choice:
            yield piece
    finally:
        await choice.aclose()
