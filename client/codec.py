"""The wire format of `loraplex.v1.Generation`, once, for the Python client and the server alike.

The client encodes requests (`encode_request`) and decodes tokens (`decode_token`, `decode_completion`);
the server's gRPC service encodes its tokens with `encode_token` / `encode_completion` (they read the
fields by name, so the server's own records encode as the client's do); the HTTP shim's remote backend
goes through the client. A refused field travels as structured trailing metadata
(`invalid_argument_metadata` / `invalid_argument`), not only inside the status message. Imports only the
generated protobuf code: no torch, no server.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from loraplex.v1 import generation_pb2 as pb

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "presence_penalty",
                   "frequency_penalty")
"""GenerateRequest.sampling's fields, each optional (unset takes the server's default)."""
INVALID_FIELD_KEY = "loraplex-invalid-field"
"""Trailing metadata of an INVALID_ARGUMENT: the refused field, as GenerateRequest (or the admin request) names it."""
INVALID_PROBLEM_KEY = "loraplex-invalid-problem-bin"
"""Trailing metadata of an INVALID_ARGUMENT: what is wrong with that field (UTF-8; binary metadata)."""

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
"""Text, token ids, or chat messages ({"role", "content"} dicts)."""


class FinishReason(enum.Enum):
    STOP = "stop"
    """The model produced an end-of-sequence or stop token (the last token)."""
    LENGTH = "length"
    """max_new_tokens or the model's context length was reached."""


FINISH_REASONS = {FinishReason.STOP.value: pb.FINISH_REASON_STOP, FinishReason.LENGTH.value: pb.FINISH_REASON_LENGTH}
"""A finish reason's value ("stop", "length") -> its wire code."""
FINISH_REASON_OF = {code: FinishReason(value) for value, code in FINISH_REASONS.items()}


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


class TokenFields(Protocol):
    """What `encode_token` reads: the fields of `Token` (the server's GeneratedToken has them too)."""

    id: int
    text: str
    logprob: float | None
    piece: str
    top_logprobs: Sequence[TokenLogprob]


class CompletionFields(Protocol):
    """What `encode_completion` reads: the fields of `Completion`; `finish_reason.value` is "stop" or "length"."""

    finish_reason: enum.Enum
    prompt_tokens: int
    generated_tokens: int
    adapter: str
    adapter_version: str


def encode_request(prompt: Prompt, adapter: str = "", *, chat: bool = False, max_new_tokens: int | None = None,
                   sampling: Mapping[str, float | int] | None = None, stop_token_ids: Sequence[int] = (),
                   ignore_eos: bool = False, logprobs: bool = False, top_logprobs: int = 0) -> pb.GenerateRequest:
    """A GenerateRequest: `prompt` is text, token ids or chat messages; `sampling` holds the SAMPLING_FIELDS
    the caller sets (the others take the server's defaults), `max_new_tokens` None the server's default."""
    request = pb.GenerateRequest(
        adapter=adapter, chat=chat, sampling=pb.SamplingParameters(**(sampling or {})), logprobs=logprobs,
        top_logprobs=top_logprobs,
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids),
                                     ignore_eos=ignore_eos),
    )
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and isinstance(prompt[0], Mapping):
        request.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    else:
        request.token_ids.ids.extend(prompt)
    return request


def decode_token(token: pb.Token) -> Token:
    return Token(token.id, token.text, token.logprob if token.HasField("logprob") else None, token.piece,
                 tuple(TokenLogprob(top.id, top.piece, top.logprob) for top in token.top_logprobs))


def decode_completion(completion: pb.Completion) -> Completion:
    return Completion(FINISH_REASON_OF[completion.finish_reason], completion.prompt_tokens,
                      completion.generated_tokens, completion.adapter, completion.adapter_version)


def encode_token(token: TokenFields) -> pb.Token:
    return pb.Token(id=token.id, text=token.text, logprob=token.logprob, piece=token.piece,
                    top_logprobs=[pb.TokenLogprob(id=top.id, piece=top.piece, logprob=top.logprob)
                                  for top in token.top_logprobs])


def encode_completion(completion: CompletionFields | None) -> pb.Completion | None:
    if completion is None:
        return None
    return pb.Completion(finish_reason=FINISH_REASONS[completion.finish_reason.value],
                         prompt_tokens=completion.prompt_tokens, generated_tokens=completion.generated_tokens,
                         adapter=completion.adapter, adapter_version=completion.adapter_version)


def invalid_argument_metadata(field: str, problem: str) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata that names an INVALID_ARGUMENT's field and problem."""
    return (INVALID_FIELD_KEY, field), (INVALID_PROBLEM_KEY, problem.encode())


def invalid_argument(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[str, str] | None:
    """(field, problem) of an INVALID_ARGUMENT's trailing metadata; None when it names no field."""
    values = dict(metadata or ())
    field, problem = values.get(INVALID_FIELD_KEY), values.get(INVALID_PROBLEM_KEY)
    if not isinstance(field, str) or not isinstance(problem, bytes):
        return None
    return field, problem.decode(errors="replace")
