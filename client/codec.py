"""The wire format of `loraplex.v1.Generation`, once, for the Python client and the server alike.

The client encodes requests (`encode_request`) and decodes tokens (`decode_token`, `decode_completion`);
the server's gRPC service encodes its tokens with `encode_token` / `encode_completion` (the records of
client/records.py, which the server's core uses too); the HTTP shim's remote backend goes through the
client. A refused field travels as structured trailing metadata
(`invalid_argument_metadata` / `invalid_argument`), not only inside the status message. Imports only the
generated protobuf code and the records: no torch, no server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loraplex.client.records import Completion, FinishReason, Token, TokenLogprob
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import tenants_pb2

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "presence_penalty",
                   "frequency_penalty")
"""GenerateRequest.sampling's fields, each optional (unset takes the server's default)."""
INVALID_FIELD_KEY = "loraplex-invalid-field"
"""Trailing metadata of an INVALID_ARGUMENT: the refused field, as GenerateRequest (or the admin request) names it."""
INVALID_PROBLEM_KEY = "loraplex-invalid-problem-bin"
"""Trailing metadata of an INVALID_ARGUMENT: what is wrong with that field (UTF-8; binary metadata)."""

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
"""Text, token ids, or chat messages ({"role", "content"} dicts)."""

FINISH_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}
FINISH_REASON_OF = {code: reason for reason, code in FINISH_REASONS.items()}
PRIORITIES = {"interactive": tenants_pb2.PRIORITY_INTERACTIVE, "batch": tenants_pb2.PRIORITY_BATCH}
"""A request's class by name, as GenerateRequest.priority encodes it (unset: PRIORITY_UNSPECIFIED)."""
PRIORITY_OF = {code: name for name, code in PRIORITIES.items()}
CONSTRAINT_KINDS = ("json_schema", "regex", "grammar", "json_object")
"""GenerateRequest.constraint's members: a constraint travels as (kind, value), value "" for json_object."""
RETRY_AFTER_KEY = "retry-after"
"""Trailing metadata of a RESOURCE_EXHAUSTED: whole seconds after which a retry may pass."""


def encode_request(prompt: Prompt, adapter: str = "", *, chat: bool = False, max_new_tokens: int | None = None,
                   sampling: Mapping[str, float | int] | None = None, stop_token_ids: Sequence[int] = (),
                   ignore_eos: bool = False, logprobs: bool = False, top_logprobs: int = 0,
                   cache_salt: str = "", priority: str | None = None, constraint: tuple[str, str] | None = None,
                   prompt_logprobs: bool = False) -> pb.GenerateRequest:
    """A GenerateRequest: `prompt` is text, token ids or chat messages; `sampling` holds the SAMPLING_FIELDS
    the caller sets (the others take the server's defaults), `max_new_tokens` None the server's default;
    `cache_salt` keeps its prefix-cache blocks to requests with the same salt; `priority` "interactive" or
    "batch" (None: the tenant's class; KeyError for another name); `constraint` (kind, value), kind one of
    CONSTRAINT_KINDS (ValueError for another); `prompt_logprobs` asks for the prompt tokens' logprobs."""
    request = pb.GenerateRequest(
        adapter=adapter, chat=chat, sampling=pb.SamplingParameters(**(sampling or {})), logprobs=logprobs,
        top_logprobs=top_logprobs, cache_salt=cache_salt, prompt_logprobs=prompt_logprobs,
        priority=tenants_pb2.PRIORITY_UNSPECIFIED if priority is None else PRIORITIES[priority],
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids),
                                     ignore_eos=ignore_eos),
    )
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and isinstance(prompt[0], Mapping):
        request.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    else:
        request.token_ids.ids.extend(prompt)
    if constraint is not None:
        kind, value = constraint
        if kind not in CONSTRAINT_KINDS:
            raise ValueError(f"constraint kind {kind!r} is not one of {', '.join(CONSTRAINT_KINDS)}")
        setattr(request, kind, True if kind == "json_object" else value)
    return request


def decode_constraint(request: pb.GenerateRequest) -> tuple[str, str] | None:
    """GenerateRequest.constraint as (kind, value); None when unset (or json_object false)."""
    kind = request.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not request.json_object):
        return None
    return kind, "" if kind == "json_object" else getattr(request, kind)


def decode_token(token: pb.Token) -> Token:
    return Token(token.id, token.text, token.logprob if token.HasField("logprob") else None, token.piece,
                 tuple(TokenLogprob(top.id, top.piece, top.logprob) for top in token.top_logprobs))


def decode_completion(completion: pb.Completion) -> Completion:
    return Completion(FINISH_REASON_OF[completion.finish_reason], completion.prompt_tokens,
                      completion.generated_tokens, completion.adapter, completion.adapter_version,
                      completion.cached_tokens)


def encode_token(token: Token) -> pb.Token:
    return pb.Token(id=token.id, text=token.text, logprob=token.logprob, piece=token.piece,
                    top_logprobs=[pb.TokenLogprob(id=top.id, piece=top.piece, logprob=top.logprob)
                                  for top in token.top_logprobs])


def encode_completion(completion: Completion | None) -> pb.Completion | None:
    if completion is None:
        return None
    return pb.Completion(finish_reason=FINISH_REASONS[completion.finish_reason],
                         prompt_tokens=completion.prompt_tokens, generated_tokens=completion.generated_tokens,
                         adapter=completion.adapter, adapter_version=completion.adapter_version,
                         cached_tokens=completion.cached_tokens)


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


def retry_after(metadata: Sequence[tuple[str, str | bytes]] | None) -> int | None:
    """The seconds a RESOURCE_EXHAUSTED's trailing metadata says to wait before a retry; None when it says none."""
    value = dict(metadata or ()).get(RETRY_AFTER_KEY)
    return int(value) if isinstance(value, str) and value.isdigit() else None
