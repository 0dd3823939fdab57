"""The gRPC `loraplex.v1.Generation` service: thin handlers, decode -> scheduler -> encode.

Generate and GenerateStream share one path (`_generate`): authenticate (scope "inference", the
key's adapter allow-list), turn protobuf into a plain `Request` (tokenizing text here, never in the
engine), submit it, and turn each token event into a `Token` with its incremental text delta;
GenerateStream sends each as it comes, Generate collects them into one answer. Refusals are raised as
server.errors exceptions; the interceptor turns them into status codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from importlib import metadata

import grpc
from transformers import PreTrainedTokenizerBase

from loraplex.server.adapter_manager import AdapterStatus, check_reference
from loraplex.server.auth import Authenticator, Principal
from loraplex.server.detokenizer import IncrementalDetokenizer
from loraplex.server.engine import FinishReason, SamplingParams
from loraplex.server.errors import InvalidRequest
from loraplex.server.scheduler import Request, RequestLimits, Scheduler
from loraplex.server.settings import Scope
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

FINISH_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}


#: Distributions whose versions ServerInfo reports besides loraplex itself.
LIBRARIES = ("torch", "transformers", "bitsandbytes", "grpcio", "protobuf")


def versions() -> pb.Versions:
    """loraplex's version and LIBRARIES' (as installed)."""
    return pb.Versions(loraplex=metadata.version("loraplex"),
                       libraries={name: metadata.version(name) for name in LIBRARIES})


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, scheduler: Scheduler, tokenizer: PreTrainedTokenizerBase | None, auth: Authenticator,
                 limits: RequestLimits, model_name: str) -> None:
        self._scheduler = scheduler
        self._tokenizer = tokenizer
        self._auth = auth
        self._limits = limits
        self._model_name = model_name
        self._versions = versions()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        response = pb.GenerateResponse()
        async for token, completion in self._generate(request, context):
            response.text += token.text
            response.tokens.append(token)
            if completion is not None:
                response.completion.CopyFrom(completion)
        return response

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for token, completion in self._generate(request, context):
            yield pb.GenerateStreamResponse(token=token, completion=completion)

    async def ServerInfo(self, request: pb.ServerInfoRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerInfoResponse:
        principal = self._authorize(context, "inference")
        engine, config = self._scheduler.engine, self._scheduler.config
        statuses = await asyncio.to_thread(self._scheduler.adapters.statuses)  # may read stored files
        return pb.ServerInfoResponse(
            base_model=pb.BaseModel(
                name=self._model_name, architecture=engine.spec.model_type, vocab_size=engine.spec.vocab_size,
                max_model_len=engine.max_model_len, has_tokenizer=self._tokenizer is not None,
                has_chat_template=bool(self._tokenizer is not None and self._tokenizer.chat_template),
            ),
            adapters=[pb.AdapterInfo(name=status.name, version=status.current, rank=_rank(status))
                      for status in statuses if principal.may_use(status.name)],
            limits=pb.Limits(
                max_new_tokens_limit=self._limits.max_new_tokens_limit,
                default_max_new_tokens=self._limits.default_max_new_tokens, max_running=config.max_running,
                max_waiting=config.max_waiting, adapter_slots=engine.num_slots,
                max_adapter_rank=engine.config.max_rank,
            ),
            versions=self._versions,
        )

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                        ) -> AsyncIterator[tuple[pb.Token, pb.Completion | None]]:
        """Authorize, decode, submit; then one (token, completion on the last one only) per generated token."""
        principal = self._authorize(context, "inference")
        principal.require_adapter(check_reference(request.adapter))
        prompt_ids = self._prompt_ids(request)
        stream = self._scheduler.submit(Request(request.adapter, prompt_ids, self._sampling(request)))
        detokenizer = IncrementalDetokenizer(self._tokenizer, prompt_ids) if self._tokenizer else None
        generated = 0
        try:
            async for event in stream:
                generated += 1
                final = event.finish_reason is not None
                token = pb.Token(id=event.token_id, text=detokenizer.add(event.token_id, final) if detokenizer else "",
                                 logprob=event.logprob if request.logprobs else None)
                completion = pb.Completion(
                    finish_reason=FINISH_REASONS[event.finish_reason], prompt_tokens=len(prompt_ids),
                    generated_tokens=generated, adapter=stream.lease.name, adapter_version=stream.lease.version,
                ) if final else None
                yield token, completion
        finally:  # the caller went away (cancel, deadline) or we are done: either way free the sequence
            stream.cancel()

    def _authorize(self, context: grpc.aio.ServicerContext, scope: Scope) -> Principal:
        return authorize(self._auth, context, scope)

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidRequest("input", "set text or token_ids")
        if request.chat and kind != "text":
            raise InvalidRequest("chat", "chat templating needs text input")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if self._tokenizer is None:
            raise InvalidRequest("text", "this model folder has no tokenizer; send token_ids")
        if not request.text:
            raise InvalidRequest("text", "must not be empty")
        if not request.chat:
            return self._tokenizer(request.text)["input_ids"]
        if not self._tokenizer.chat_template:
            raise InvalidRequest("chat", "this model has no chat template; send plain text")
        return self._tokenizer.apply_chat_template([{"role": "user", "content": request.text}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)

    def _sampling(self, request: pb.GenerateRequest) -> SamplingParams:
        stopping, sampling = request.stopping, request.sampling
        max_new_tokens = (stopping.max_new_tokens if stopping.HasField("max_new_tokens")
                          else self._limits.default_max_new_tokens)
        self._limits.check_max_new_tokens(max_new_tokens, "stopping.max_new_tokens")
        vocab_size = self._scheduler.engine.spec.vocab_size
        if any(t >= vocab_size for t in stopping.stop_token_ids):
            raise InvalidRequest("stopping.stop_token_ids", f"token ids must lie in [0, {vocab_size})")
        values = {name: getattr(sampling, name) for name in ("temperature", "top_k", "top_p", "repetition_penalty",
                                                             "seed") if sampling.HasField(name)}
        try:
            return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stopping.stop_token_ids),
                                  ignore_eos=stopping.ignore_eos, **values)
        except ValueError as exc:  # "invalid sampling parameter top_p=2.0"
            raise InvalidRequest("sampling", str(exc)) from exc


def authorize(auth: Authenticator, context: grpc.aio.ServicerContext, scope: Scope) -> Principal:
    """The caller of `context` (its `authorization` metadata), if it has `scope`; else Unauthenticated or
    PermissionDenied."""
    metadata = dict(context.invocation_metadata() or ())
    principal = auth.authenticate(metadata.get("authorization"))
    principal.require_scope(scope)
    return principal


def _rank(status: AdapterStatus) -> int:
    """Rank of `status`'s current version (0 if its stored files no longer validate)."""
    current = next(version for version in status.versions if version.digest == status.current)
    return current.summary.rank if current.summary is not None else 0
