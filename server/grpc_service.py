"""The gRPC `loraplex.v1.Generation` service: thin handlers, decode -> generation core -> encode.

Generate and GenerateStream share one path (`_generate`): decode the protobuf into a `GenerateCall`,
run it through the transport-neutral `GenerationCore` (auth, tokenizing, submit; server/generation.py)
and encode each generated token as a `Token`; GenerateStream sends each as it comes, Generate collects
them into one answer. Refusals are raised as server.errors exceptions; the interceptor turns them into
status codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from importlib import metadata

import grpc

from loraplex.server.adapter_manager import AdapterStatus
from loraplex.server.auth import Authenticator, Principal
from loraplex.server.engine import FinishReason
from loraplex.server.errors import InvalidRequest
from loraplex.server.generation import (
    ChatMessage,
    Completion,
    GenerateCall,
    GeneratedToken,
    GenerationCore,
    TokenLogprob,
)
from loraplex.server.settings import Scope
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

FINISH_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}
FINISH_REASON_OF = {code: reason for reason, code in FINISH_REASONS.items()}
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "presence_penalty",
                   "frequency_penalty")
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
            if token.completion is not None:
                response.completion.CopyFrom(encode_completion(token.completion))
        return response

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for token in self._generate(request, context):
            yield pb.GenerateStreamResponse(token=encode_token(token), completion=encode_completion(token.completion),
                                            prompt_tokens=token.prompt_tokens)

    async def ServerInfo(self, request: pb.ServerInfoRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerInfoResponse:
        core = self._core
        principal = core.authorize(_authorization(context))
        engine, config = core.scheduler.engine, core.scheduler.config
        statuses = await asyncio.to_thread(core.scheduler.adapters.statuses)  # may read stored files
        return pb.ServerInfoResponse(
            base_model=pb.BaseModel(
                name=core.model_name, architecture=engine.spec.model_type, vocab_size=engine.spec.vocab_size,
                max_model_len=engine.max_model_len, has_tokenizer=core.tokenizer is not None,
                has_chat_template=bool(core.tokenizer is not None and core.tokenizer.chat_template),
            ),
            adapters=[pb.AdapterInfo(name=status.name, version=status.current, rank=_rank(status))
                      for status in statuses if principal.may_use(status.name)],
            limits=pb.Limits(
                max_new_tokens_limit=core.limits.max_new_tokens_limit,
                default_max_new_tokens=core.limits.default_max_new_tokens, max_running=config.max_running,
                max_waiting=config.max_waiting, adapter_slots=engine.num_slots,
                max_adapter_rank=engine.config.max_rank,
            ),
            versions=self._versions,
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
    return GenerateCall(
        adapter=request.adapter, prompt=prompt, chat=request.chat,
        max_new_tokens=stopping.max_new_tokens if stopping.HasField("max_new_tokens") else None,
        sampling={name: getattr(sampling, name) for name in SAMPLING_FIELDS if sampling.HasField(name)},
        stop_token_ids=tuple(stopping.stop_token_ids), ignore_eos=stopping.ignore_eos,
        logprobs=request.logprobs, top_logprobs=request.top_logprobs,
    )


def encode_request(call: GenerateCall) -> pb.GenerateRequest:
    """The GenerateRequest that decodes to `call` (the HTTP shim's requests to a remote server)."""
    request = pb.GenerateRequest(
        adapter=call.adapter, chat=call.chat, sampling=pb.SamplingParameters(**call.sampling),
        stopping=pb.StoppingCriteria(max_new_tokens=call.max_new_tokens, stop_token_ids=call.stop_token_ids,
                                     ignore_eos=call.ignore_eos),
        logprobs=call.logprobs, top_logprobs=call.top_logprobs)
    prompt = call.prompt
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and isinstance(prompt[0], ChatMessage):
        request.messages.messages.extend(pb.ChatMessage(role=m.role, content=m.content) for m in prompt)
    else:
        request.token_ids.ids.extend(prompt)
    return request


def decode_token(token: pb.Token, completion: pb.Completion | None, prompt_tokens: int) -> GeneratedToken:
    """The GeneratedToken a GenerateStreamResponse carries."""
    done = None if completion is None else Completion(
        FINISH_REASON_OF[completion.finish_reason], completion.prompt_tokens, completion.generated_tokens,
        completion.adapter, completion.adapter_version)
    return GeneratedToken(token.id, token.text, token.logprob if token.HasField("logprob") else None, token.piece,
                          tuple(TokenLogprob(top.id, top.piece, top.logprob) for top in token.top_logprobs), done,
                          prompt_tokens)


def encode_token(token: GeneratedToken) -> pb.Token:
    return pb.Token(id=token.id, text=token.text, logprob=token.logprob, piece=token.piece,
                    top_logprobs=[pb.TokenLogprob(id=top.id, piece=top.piece, logprob=top.logprob)
                                  for top in token.top_logprobs])


def encode_completion(completion: Completion | None) -> pb.Completion | None:
    if completion is None:
        return None
    return pb.Completion(finish_reason=FINISH_REASONS[completion.finish_reason],
                         prompt_tokens=completion.prompt_tokens, generated_tokens=completion.generated_tokens,
                         adapter=completion.adapter, adapter_version=completion.adapter_version)


def authorize(auth: Authenticator, context: grpc.aio.ServicerContext, scope: Scope) -> Principal:
    """The caller of `context` (its `authorization` metadata), if it has `scope`; else Unauthenticated or
    PermissionDenied."""
    return auth.authorize(_authorization(context), scope)


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return dict(context.invocation_metadata() or ()).get("authorization")


def _rank(status: AdapterStatus) -> int:
    """Rank of `status`'s current version (0 if its stored files no longer validate)."""
    current = next(version for version in status.versions if version.digest == status.current)
    return current.summary.rank if current.summary is not None else 0
