"""Python client for a loraplex server: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate_stream("Hello", adapter="support", max_new_tokens=32):
            print(chunk.text, end="")
        result = client.generate("Hello", adapter="support@3f2a9c01")   # a Generation

Results are typed (`Generation`, `Chunk`, `Token`, `Completion`); `server_info()` returns the
`loraplex.v1.ServerInfoResponse` message. `timeout` is a call's whole deadline in seconds, retries
included. Calls that fail with UNAVAILABLE (server unreachable or shutting down) are retried with
exponential backoff (gRPC's own retry policy, `RetryPolicy`); no other status is retried, and a stream
is never retried once it has yielded a token. Errors arrive as grpc.RpcError (`.code()`,
`.details()`): NOT_FOUND for an unknown adapter, INVALID_ARGUMENT naming the bad field,
RESOURCE_EXHAUSTED when the server's queue is full, ...
"""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import grpc

from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class FinishReason(enum.Enum):
    STOP = "stop"
    """The model produced an end-of-sequence or stop token (the last token)."""
    LENGTH = "length"
    """max_new_tokens or the model's context length was reached."""


_FINISH_REASONS = {pb.FINISH_REASON_STOP: FinishReason.STOP, pb.FINISH_REASON_LENGTH: FinishReason.LENGTH}


@dataclass(frozen=True)
class Token:
    """One generated token."""

    id: int
    text: str
    """Text this token adds ("" while a UTF-8 character is incomplete, or without a tokenizer)."""
    logprob: float | None
    """Log-probability under the model's unprocessed distribution; None unless `logprobs=True` was asked."""

    @classmethod
    def from_proto(cls, token: pb.Token) -> Token:
        return cls(token.id, token.text, token.logprob if token.HasField("logprob") else None)


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

    @classmethod
    def from_proto(cls, completion: pb.Completion) -> Completion:
        return cls(_FINISH_REASONS[completion.finish_reason], completion.prompt_tokens, completion.generated_tokens,
                   completion.adapter, completion.adapter_version)


@dataclass(frozen=True)
class Chunk:
    """One streamed token; the last chunk of a stream also carries the completion."""

    token: Token
    completion: Completion | None

    @property
    def text(self) -> str:
        return self.token.text

    @classmethod
    def from_proto(cls, response: pb.GenerateStreamResponse) -> Chunk:
        completion = Completion.from_proto(response.completion) if response.HasField("completion") else None
        return cls(Token.from_proto(response.token), completion)


@dataclass(frozen=True)
class Generation:
    """A whole generation: the decoded text, every token, and how it ended."""

    text: str
    tokens: list[Token]
    completion: Completion

    @property
    def token_ids(self) -> list[int]:
        return [token.id for token in self.tokens]

    @classmethod
    def from_proto(cls, response: pb.GenerateResponse) -> Generation:
        return cls(response.text, [Token.from_proto(t) for t in response.tokens],
                   Completion.from_proto(response.completion))


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that fail with UNAVAILABLE: the n-th retry waits a random time up to
    min(initial_backoff_s * multiplier**(n-1), max_backoff_s) (gRPC's exponential backoff with jitter)."""

    max_attempts: int = 5
    """Attempts in all, the first included; 1 turns retries off. gRPC allows at most 5."""
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts={self.max_attempts} is outside [1, 5]")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s or self.multiplier < 1:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s and multiplier >= 1")

    def service_config(self) -> str:
        """The gRPC service config (JSON) applying this policy to every method of the service."""
        retry = {"maxAttempts": self.max_attempts, "initialBackoff": f"{self.initial_backoff_s:.6f}s",
                 "maxBackoff": f"{self.max_backoff_s:.6f}s", "backoffMultiplier": self.multiplier,
                 "retryableStatusCodes": ["UNAVAILABLE"]}
        methods = [{"name": [{"service": SERVICE}], **({"retryPolicy": retry} if self.max_attempts > 1 else {})}]
        return json.dumps({"methodConfig": methods})


def build_request(prompt: str | Sequence[int], adapter: str = "", *, chat: bool = False,
                  max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                  stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                  logprobs: bool = False) -> pb.GenerateRequest:
    """A GenerateRequest: `prompt` is text (tokenized by the server) or token ids; None leaves the
    server default; `adapter` is "NAME", "NAME@VERSION" or "" (the base model); `chat` applies the
    model's chat template to text; `logprobs` asks for each token's log-probability."""
    sampling = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                      repetition_penalty=repetition_penalty, seed=seed).items() if v is not None}
    request = pb.GenerateRequest(
        adapter=adapter, chat=chat, sampling=pb.SamplingParameters(**sampling), logprobs=logprobs,
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids),
                                     ignore_eos=ignore_eos),
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def _channel_setup(tls: bool, root_certificates: bytes | None, retry: RetryPolicy,
                   ) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str | int]]]:
    """Both clients' channel: TLS credentials (None: plaintext) and options carrying the retry policy."""
    credentials = grpc.ssl_channel_credentials(root_certificates) if tls or root_certificates else None
    return credentials, [("grpc.service_config", retry.service_config()), ("grpc.enable_retries", 1)]


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    """Blocking client over one channel.

    `api_key` is sent as `authorization: Bearer KEY`. `tls=True` uses TLS, verifying the server
    against `root_certificates` (PEM bytes; None uses the system's roots); giving
    `root_certificates` implies TLS. `retry` governs retries on UNAVAILABLE."""

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | None = None, retry: RetryPolicy = RetryPolicy()) -> None:
        credentials, options = _channel_setup(tls, root_certificates, retry)
        self._channel = (grpc.insecure_channel(target, options) if credentials is None
                         else grpc.secure_channel(target, credentials, options))
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = _metadata(api_key)

    def generate(self, prompt: str | Sequence[int], adapter: str = "", timeout: float | None = None,
                 **options) -> Generation:
        """The whole generation in one answer; `options` are build_request's keyword arguments."""
        response = self._stub.Generate(build_request(prompt, adapter, **options), timeout=timeout,
                                       metadata=self._metadata)
        return Generation.from_proto(response)

    def generate_stream(self, prompt: str | Sequence[int], adapter: str = "", timeout: float | None = None,
                        **options) -> Iterator[Chunk]:
        """One chunk per generated token, as the server produces them; `options` are build_request's
        keyword arguments. Leaving the loop early cancels the request on the server."""
        call = self._stub.GenerateStream(build_request(prompt, adapter, **options), timeout=timeout,
                                         metadata=self._metadata)
        try:
            for response in call:
                yield Chunk.from_proto(response)
        finally:
            call.cancel()

    def server_info(self, timeout: float | None = None) -> pb.ServerInfoResponse:
        """The base model, adapters, limits and versions of the server."""
        return self._stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client over one channel (create it inside the event loop that uses it); arguments and
    methods as `Client`."""

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | None = None, retry: RetryPolicy = RetryPolicy()) -> None:
        credentials, options = _channel_setup(tls, root_certificates, retry)
        self._channel = (grpc.aio.insecure_channel(target, options) if credentials is None
                         else grpc.aio.secure_channel(target, credentials, options))
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = _metadata(api_key)

    async def generate(self, prompt: str | Sequence[int], adapter: str = "", timeout: float | None = None,
                       **options) -> Generation:
        response = await self._stub.Generate(build_request(prompt, adapter, **options), timeout=timeout,
                                             metadata=self._metadata)
        return Generation.from_proto(response)

    async def generate_stream(self, prompt: str | Sequence[int], adapter: str = "", timeout: float | None = None,
                              **options) -> AsyncIterator[Chunk]:
        call = self._stub.GenerateStream(build_request(prompt, adapter, **options), timeout=timeout,
                                         metadata=self._metadata)
        try:
            async for response in call:
                yield Chunk.from_proto(response)
        finally:
            call.cancel()

    async def server_info(self, timeout: float | None = None) -> pb.ServerInfoResponse:
        return await self._stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout, metadata=self._metadata)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
