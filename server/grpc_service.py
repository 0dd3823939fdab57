"""The gRPC `loraplex.v1.Generation` service: thin handlers, decode -> scheduler -> encode.

Handlers authenticate, turn protobuf into a plain `Request` (tokenizing text here, never in the
engine), submit it, and stream one response per token with incremental text deltas. Refusals are
raised as server.errors exceptions; the interceptor turns them into status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from transformers import PreTrainedTokenizerBase

from loraplex.server.auth import Authenticator, Principal
from loraplex.server.detokenizer import IncrementalDetokenizer
from loraplex.server.engine import FinishReason, SamplingParams
from loraplex.server.errors import InvalidRequest
from loraplex.server.scheduler import Request, Scheduler
from loraplex.server.settings import Scope
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

FINISH_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}


@dataclass(frozen=True)
class RequestLimits:
    default_max_new_tokens: int
    max_new_tokens_limit: int


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, scheduler: Scheduler, tokenizer: PreTrainedTokenizerBase | None, auth: Authenticator,
                 limits: RequestLimits, model_name: str) -> None:
        self._scheduler = scheduler
        self._tokenizer = tokenizer
        self._auth = auth
        self._limits = limits
        self._model_name = model_name

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        self._authorize(context, "generate").require_adapter(request.adapter)
        prompt_ids = self._prompt_ids(request)
        stream = self._scheduler.submit(Request(request.adapter, prompt_ids, self._sampling(request)))
        detokenizer = IncrementalDetokenizer(self._tokenizer, prompt_ids) if self._tokenizer else None
        generated = 0
        try:
            async for event in stream:
                generated += 1
                final = event.finish_reason is not None
                response = pb.GenerateResponse(
                    token_id=event.token_id, logprob=event.logprob,
                    text=detokenizer.add(event.token_id, final) if detokenizer else "",
                )
                if final:
                    response.completion.CopyFrom(pb.Completion(
                        finish_reason=FINISH_REASONS[event.finish_reason], prompt_tokens=len(prompt_ids),
                        generated_tokens=generated, adapter=stream.lease.name, adapter_version=stream.lease.version,
                    ))
                yield response
        finally:  # the caller went away (cancel, deadline) or we are done: either way free the sequence
            stream.cancel()

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        self._authorize(context, "info")
        engine = self._scheduler.engine
        return pb.InfoResponse(
            model=self._model_name, vocab_size=engine.spec.vocab_size, max_model_len=engine.max_model_len,
            max_new_tokens_limit=self._limits.max_new_tokens_limit, has_tokenizer=self._tokenizer is not None,
            adapters=[pb.AdapterInfo(name=a.name, version=a.version, rank=a.rank)
                      for a in self._scheduler.adapters.adapters()],
        )

    def _authorize(self, context: grpc.aio.ServicerContext, scope: Scope) -> Principal:
        metadata = dict(context.invocation_metadata() or ())
        principal = self._auth.authenticate(metadata.get("authorization"))
        principal.require_scope(scope)
        return principal

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
        if not 1 <= max_new_tokens <= self._limits.max_new_tokens_limit:
            raise InvalidRequest("stopping.max_new_tokens", f"{max_new_tokens} is outside "
                                 f"[1, {self._limits.max_new_tokens_limit}] (this server's limit)")
        values = {name: getattr(sampling, name) for name in ("temperature", "top_k", "top_p", "repetition_penalty",
                                                             "seed") if sampling.HasField(name)}
        try:
            return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stopping.stop_token_ids),
                                  ignore_eos=stopping.ignore_eos, **values)
        except ValueError as exc:  # "invalid sampling parameter top_p=2.0"
            raise InvalidRequest("sampling", str(exc)) from exc
