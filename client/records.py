"""The records of a generation as both sides of the wire read them: a token, its candidates, how the
generation ended. Plain data, importing nothing: the client's results, the server core's tokens and the
codec between them all use these."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    STOP = "stop"
    """The model produced an end-of-sequence or stop token (the last token)."""
    LENGTH = "length"
    """max_new_tokens or the model's context length was reached."""


@dataclass(frozen=True)
class TokenLogprob:
    """A candidate token of one step: id, its text alone, log-probability (unprocessed distribution)."""

    id: int
    piece: str
    logprob: float


@dataclass(frozen=True)
class Token:
    """One generated token."""

    id: int
    text: str
    """Text this token adds ("" while a UTF-8 character is incomplete, or without a tokenizer)."""
    logprob: float | None
    """Log-probability under the model's unprocessed distribution; None unless `logprobs=True` was asked."""
    piece: str = ""
    """The token decoded alone; "" unless `logprobs` or `top_logprobs` was asked."""
    top_logprobs: tuple[TokenLogprob, ...] = ()
    """The `top_logprobs` most likely tokens of this step, most likely first."""


@dataclass(frozen=True)
class Completion:
    """How a generation ended, and what it ran with."""

    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    adapter: str
    """Adapter name ("" for the base model)."""
    adapter_version: str
    """Full sha256 content digest of the adapter version used ("" for the base model)."""
    cached_tokens: int = 0
    """Of prompt_tokens, those whose keys and values came from the prefix cache (not prefilled)."""
