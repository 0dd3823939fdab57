"""The gRPC `loraplex.v1.Generation` service: thin handlers, decode -> generation core -> encode.

Generate and GenerateStream share one path (`_generate`): decode the protobuf into a `GenerateCall`,
run it through the transport-neutral `GenerationCore` (auth, tokenizing, submit; server/core/generation.py)
and encode each generated token as a `Token` with the wire codec the client shares (client/codec.py);
GenerateStream sends each as it comes, Generate collects them into one answer. Refusals are raised as
server/core/errors.py exceptions; the interceptor turns them into status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import metadata

import grpc

from loraplex.client.codec import (
    PRIORITIES,
    PRIORITY_OF,
    SAMPLING_FIELDS,
    decode_constraint,
    encode_completion,
    encode_token,
)
from loraplex.server.core.auth import Authenticator, Principal, Scope
from loraplex.server.core.calls import ChatMessage, Constraint, GenerateCall, GeneratedToken
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.generation import GenerationCore
from loraplex.server.core.quota_config import ShareLimits
from loraplex.server.core.quotas import QuotaStatus
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc
from loraplex.v1 import tenants_pb2

FIELD_NAMES = {"max_new_tokens": "stopping.max_new_tokens", "stop_token_ids": "stopping.stop_token_ids",
               **{name: f"sampling.{name}" for name in SAMPLING_FIELDS}}
"""GenerateCall's field names as GenerateRequest spells them (in INVALID_ARGUMENT messages)."""


#: Distributions whose versions ServerInfo reports besides loraplex itself.
LIBRARIES = ("torch", "transformers", "bitsandbytes", "grpcio", "protobuf")


def versions() -> pb.Versions:
    """loraplex's version and LIBRARIES' (as installed)."""
    return pb.Versions(loraplex=metadata.version("loraplex"),
                       libraries={name: metadata.version(name) for name in LIBRARIES})


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, core: GenerationCore) -> None:
        self._core = core
        self._versions = versions()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        response = pb.GenerateResponse()
        async for token in self._generate(request, context):
            response.text += token.text
            response.tokens.append(encode_token(token))
            response.prompt_logprobs.extend(encode_token(prompt) for prompt in token.prompt_logprobs or ())
            if token.completion is not None:
                response.completion.CopyFrom(encode_completion(token.completion))
        return response

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for token in self._generate(request, context):
            yield pb.GenerateStreamResponse(token=encode_token(token), completion=encode_completion(token.completion),
                                            prompt_tokens=token.prompt_tokens, cached_tokens=token.cached_tokens,
                                            prompt_logprobs=[encode_token(p) for p in token.prompt_logprobs or ()])

    async def ServerInfo(self, request: pb.ServerInfoRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerInfoResponse:
        facts = await self._core.server_facts(_authorization(context))
        return pb.ServerInfoResponse(
            base_model=pb.BaseModel(
                name=facts.model_name, architecture=facts.architecture, vocab_size=facts.vocab_size,
                max_model_len=facts.max_model_len, has_tokenizer=facts.has_tokenizer,
                has_chat_template=facts.has_chat_template,
            ),
            adapters=[pb.AdapterInfo(name=adapter.name, version=adapter.version, rank=adapter.rank)
                      for adapter in facts.adapters],
            limits=pb.Limits(
                max_new_tokens_limit=facts.max_new_tokens_limit, default_max_new_tokens=facts.default_max_new_tokens,
                max_running=facts.max_running, max_waiting=facts.max_waiting, adapter_slots=facts.adapter_slots,
                max_adapter_rank=facts.max_adapter_rank,
            ),
            versions=self._versions, tenant=encode_quota_status(facts.tenant),
        )

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                        ) -> AsyncIterator[GeneratedToken]:
        """Decode, run through the core; then its tokens (field names in refusals as GenerateRequest's)."""
        kind = request.WhichOneof("input")
        names = {**FIELD_NAMES, **({"prompt": "text"} if kind == "text" else {})}
        try:
            async for token in self._core.generate(_authorization(context), decode_request(request)):
                yield token
        except InvalidRequest as error:
            raise error.renamed(names) from None


def decode_request(request: pb.GenerateRequest) -> GenerateCall:
    """The GenerateCall a GenerateRequest asks for (InvalidRequest when it has no input)."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input", "set text or token_ids")
    prompt = {"text": lambda: request.text, "token_ids": lambda: list(request.token_ids.ids),
              "messages": lambda: [ChatMessage(m.role, m.content) for m in request.messages.messages]}[kind]()
    stopping, sampling = request.stopping, request.sampling
    constraint = decode_constraint(request)
    return GenerateCall(
        adapter=request.adapter, prompt=prompt, chat=request.chat,
        max_new_tokens=stopping.max_new_tokens if stopping.HasField("max_new_tokens") else None,
        sampling={name: getattr(sampling, name) for name in SAMPLING_FIELDS if sampling.HasField(name)},
        stop_token_ids=tuple(stopping.stop_token_ids), ignore_eos=stopping.ignore_eos,
        logprobs=request.logprobs, top_logprobs=request.top_logprobs, cache_salt=request.cache_salt,
        priority=PRIORITY_OF.get(request.priority),
        constraint=None if constraint is None else Constraint(*constraint), prompt_logprobs=request.prompt_logprobs,
    )


def encode_quota_status(status: QuotaStatus) -> tenants_pb2.QuotaStatus:
    """A tenant's or adapter's limits and usage (ServerInfo.tenant, TenantAdmin)."""
    limits = status.limits
    encoded = tenants_pb2.QuotaLimits(max_concurrent=limits.max_concurrent, max_queued=limits.max_queued,
                                      tokens_per_minute=limits.tokens_per_minute, burst_tokens=limits.bucket_capacity())
    if isinstance(limits, ShareLimits):
        encoded.weight, encoded.priority = limits.weight, PRIORITIES[limits.priority]
    return tenants_pb2.QuotaStatus(name=status.name, limits=encoded, in_flight=status.in_flight, queued=status.queued,
                                   served_tokens=status.served_tokens, bucket_tokens=status.bucket_tokens)


def authorize(auth: Authenticator, context: grpc.aio.ServicerContext, scope: Scope) -> Principal:
    """The caller of `context` (its `authorization` metadata), if it has `scope`; else Unauthenticated or
    PermissionDenied."""
    return auth.authorize(_authorization(context), scope)


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return dict(context.invocation_metadata() or ()).get("authorization")
