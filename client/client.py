"""Python client for a loraplex server: `Client` (blocking) and `AsyncClient` (asyncio), both streaming.

    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate_stream("Hello", adapter="support", max_new_tokens=32):
            print(chunk.text, end="")

Errors arrive as grpc.RpcError (`.code()`, `.details()`): NOT_FOUND for an unknown adapter,
INVALID_ARGUMENT naming the bad field, RESOURCE_EXHAUSTED when the server's queue is full, ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


def build_request(prompt: str | Sequence[int], adapter: str = "", *, chat: bool = False,
                  max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                  stop_token_ids: Sequence[int] = (), ignore_eos: bool = False) -> pb.GenerateRequest:
    """A GenerateRequest: `prompt` is text (tokenized by the server) or token ids; None leaves the
    server default; `adapter` "" is the base model; `chat` applies the model's chat template to text."""
    sampling = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                      repetition_penalty=repetition_penalty, seed=seed).items() if v is not None}
    request = pb.GenerateRequest(
        adapter=adapter, chat=chat, sampling=pb.SamplingParameters(**sampling),
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids),
                                     ignore_eos=ignore_eos),
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


@dataclass
class Generation:
    """A whole generation: the concatenated text deltas, every token id, and the final summary."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    completion: pb.Completion | None = None

    def add(self, response: pb.GenerateResponse) -> None:
        self.text += response.text
        self.token_ids.append(response.token_id)
        if response.HasField("completion"):
            self.completion = response.completion


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    """Blocking client over one channel; `timeout` (seconds) is each call's gRPC deadline."""

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = _metadata(api_key)

    def generate_stream(self, prompt: str | Sequence[int], adapter: str = "", timeout: float | None = None,
                        **options) -> Iterator[pb.GenerateResponse]:
        """One response per generated token; `options` are build_request's keyword arguments. Leaving
        the loop early cancels the request on the server."""
        call = self._stub.Generate(build_request(prompt, adapter, **options), timeout=timeout,
                                   metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def generate(self, prompt: str | Sequence[int], adapter: str = "", timeout: float | None = None,
                 **options) -> Generation:
        generation = Generation()
        for response in self.generate_stream(prompt, adapter, timeout, **options):
            generation.add(response)
        return generation

    def info(self, timeout: float | None = None) -> pb.InfoResponse:
        return self._stub.Info(pb.InfoRequest(), timeout=timeout, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client over one channel (create it inside the event loop that uses it)."""

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = _metadata(api_key)

    async def generate_stream(self, prompt: str | Sequence[int], adapter: str = "", timeout: float | None = None,
                              **options) -> AsyncIterator[pb.GenerateResponse]:
        """As Client.generate_stream."""
        call = self._stub.Generate(build_request(prompt, adapter, **options), timeout=timeout,
                                   metadata=self._metadata)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def generate(self, prompt: str | Sequence[int], adapter: str = "", timeout: float | None = None,
                       **options) -> Generation:
        generation = Generation()
        async for response in self.generate_stream(prompt, adapter, timeout, **options):
            generation.add(response)
        return generation

    async def info(self, timeout: float | None = None) -> pb.InfoResponse:
        return await self._stub.Info(pb.InfoRequest(), timeout=timeout, metadata=self._metadata)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
