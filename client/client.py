"""Python client for a loraplex server: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate_stream("Hello", adapter="support", max_new_tokens=32):
            print(chunk.text, end="")
        result = client.generate("Hello", adapter="support@3f2a9c01")   # a Generation

Results are typed (`Generation`, `Chunk`, `Token`, `Completion`); `server_info()` returns the
`loraplex.v1.ServerInfoResponse` message. The adapter administration methods (`load_adapter`,
`unload_adapter`, `list_adapters`, `describe_adapter`, `validate_adapter`, `pin_adapter`,
`prefetch_adapter`; the `loraplex.v1.AdapterAdmin` service, API key with the "admin" scope) return the
RPC's response message (`loraplex.v1.admin_pb2`); so do the tenant administration methods (`list_tenants`,
`reload_quotas`; `loraplex.v1.TenantAdmin`, `loraplex.v1.tenants_pb2`).

    with Client("127.0.0.1:50051", api_key=ADMIN_KEY) as client:
        loaded = client.load_adapter("support", "/srv/adapters/support-v2")   # or "s3://bucket/prefix"
        print(loaded.adapter.current_version, loaded.changed)

`timeout` is a call's whole deadline in seconds, retries included. Generation calls that fail with
UNAVAILABLE (server unreachable or shutting down) are retried with exponential backoff (gRPC's own
retry policy, `RetryPolicy`); no other status is retried, and a stream is never retried once it has
yielded a token. AdapterAdmin calls are never retried (see `RetryPolicy.service_config`). Errors
arrive as grpc.RpcError (`.code()`, `.details()`): NOT_FOUND for an unknown adapter,
INVALID_ARGUMENT naming the bad field, ... A generation refused over a limit (the server's queue is full,
or the caller's tenant or the adapter is over a quota) raises `ResourceExhausted`, a grpc.RpcError with
`retry_after_s`, the seconds the server says to wait:

    try:
        client.generate("Hello")
    except ResourceExhausted as error:
        time.sleep(error.retry_after_s)   # error.details() names the limit
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.client.codec import Prompt, decode_completion, decode_token, encode_request, retry_after
from loraplex.client.records import Completion, Token
from loraplex.v1 import admin_pb2 as admin_pb
from loraplex.v1 import admin_pb2_grpc as admin_pb_grpc
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc
from loraplex.v1 import tenants_pb2 as tenants_pb
from loraplex.v1 import tenants_pb2_grpc as tenants_pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class ResourceExhausted(grpc.aio.AioRpcError):
    """RESOURCE_EXHAUSTED with the server's `retry-after`: its waiting queue is full, or the caller's tenant or
    the adapter is over a quota (`details()` names the limit, e.g. "tenant 'team-a' is over its max_concurrent
    of 2 ..."). Still a grpc.RpcError (and a grpc.aio.AioRpcError) with `code()`, `details()` and
    `trailing_metadata()`; `retry_after_s` is the whole seconds to wait before a retry may pass."""

    def __init__(self, error: grpc.RpcError, retry_after_s: int) -> None:
        super().__init__(error.code(), error.initial_metadata(), error.trailing_metadata(), error.details(),
                         error.debug_error_string())
        self.retry_after_s = retry_after_s


def typed_error(error: grpc.RpcError) -> grpc.RpcError:
    """`error` as ResourceExhausted when it is a RESOURCE_EXHAUSTED that says when to retry, else itself."""
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        seconds = retry_after(error.trailing_metadata())
        if seconds is not None:
            return ResourceExhausted(error, seconds)
    return error


@dataclass(frozen=True)
class Chunk:
    """One streamed token; the last chunk of a stream also carries the completion."""

    token: Token
    completion: Completion | None
    prompt_tokens: int = 0
    """Tokens in the prompt, on the first chunk of a stream (0 on the others)."""
    cached_tokens: int = 0
    """Of those, tokens found in the server's prefix cache, on the first chunk (0 on the others)."""
    prompt_logprobs: tuple[Token, ...] | None = None
    """With prompt_logprobs=True, on the first chunk: the prompt's tokens, the first without a logprob."""

    @property
    def text(self) -> str:
        return self.token.text

    @classmethod
    def from_proto(cls, response: pb.GenerateStreamResponse) -> Chunk:
        completion = decode_completion(response.completion) if response.HasField("completion") else None
        prompt = tuple(decode_token(t) for t in response.prompt_logprobs) or None
        return cls(decode_token(response.token), completion, response.prompt_tokens, response.cached_tokens, prompt)


@dataclass(frozen=True)
class Generation:
    """A whole generation: the decoded text, every token, and how it ended."""

    text: str
    tokens: list[Token]
    completion: Completion
    prompt_logprobs: list[Token] | None = None
    """With prompt_logprobs=True: the prompt's tokens, the first without a logprob."""

    @property
    def token_ids(self) -> list[int]:
        return [token.id for token in self.tokens]

    @classmethod
    def from_proto(cls, response: pb.GenerateResponse) -> Generation:
        return cls(response.text, [decode_token(t) for t in response.tokens], decode_completion(response.completion),
                   [decode_token(t) for t in response.prompt_logprobs] or None)


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
        """The gRPC service config (JSON) applying this policy to every method of the Generation service.

        It names no AdapterAdmin method, so those are never retried (gRPC retries a call only under a
        matching method config; its transparent retries resend only calls that never reached the
        server). That is deliberate for the mutations: an UNAVAILABLE from a connection lost mid-call
        does not say whether the server applied the change, and a blind resend may undo another
        administrator's change made meanwhile (LoadAdapter, PinAdapter) or answer NOT_FOUND for an
        unload that succeeded (UnloadAdapter). Callers decide, e.g. by checking `describe_adapter`."""
        retry = {"maxAttempts": self.max_attempts, "initialBackoff": f"{self.initial_backoff_s:.6f}s",
                 "maxBackoff": f"{self.max_backoff_s:.6f}s", "backoffMultiplier": self.multiplier,
                 "retryableStatusCodes": ["UNAVAILABLE"]}
        methods = [{"name": [{"service": SERVICE}], **({"retryPolicy": retry} if self.max_attempts > 1 else {})}]
        return json.dumps({"methodConfig": methods})


def build_request(prompt: Prompt, adapter: str = "", *,
                  chat: bool = False, max_new_tokens: int | None = None, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                  seed: int | None = None, presence_penalty: float | None = None,
                  frequency_penalty: float | None = None, stop_token_ids: Sequence[int] = (),
                  ignore_eos: bool = False, logprobs: bool = False, top_logprobs: int = 0,
                  cache_salt: str = "", priority: str | None = None, json_schema: str | None = None,
                  regex: str | None = None, grammar: str | None = None, json_object: bool = False,
                  prompt_logprobs: bool = False) -> pb.GenerateRequest:
    """A GenerateRequest: `prompt` is text (tokenized by the server), token ids, or chat messages
    (`{"role": ..., "content": ...}` dicts, rendered with the model's chat template); None leaves the
    server default; `adapter` is "NAME", "NAME@VERSION" or "" (the base model); `chat` applies the
    model's chat template to text; `logprobs` asks for each token's log-probability, `top_logprobs` for
    that many most likely alternatives of each step; `cache_salt` shares prefix-cache blocks only with
    requests that send the same salt; `priority` "batch" waits while interactive requests do ("interactive",
    or None: the tenant's class); at most one of `json_schema` (JSON text), `regex`, `grammar` (EBNF) and
    `json_object` constrains the output (ValueError for several); `prompt_logprobs` asks for the prompt
    tokens' logprobs (Generation.prompt_logprobs, Chunk.prompt_logprobs)."""
    sampling = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                      repetition_penalty=repetition_penalty, seed=seed,
                                      presence_penalty=presence_penalty,
                                      frequency_penalty=frequency_penalty).items() if v is not None}
    constraints = [(kind, value) for kind, value in (("json_schema", json_schema), ("regex", regex),
                                                     ("grammar", grammar), ("json_object", "" if json_object else None))
                   if value is not None]
    if len(constraints) > 1:
        raise ValueError(f"set at most one constraint, not {', '.join(kind for kind, _ in constraints)}")
    return encode_request(prompt, adapter, chat=chat, max_new_tokens=max_new_tokens, sampling=sampling,
                          stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, logprobs=logprobs,
                          top_logprobs=top_logprobs, cache_salt=cache_salt, priority=priority,
                          constraint=constraints[0] if constraints else None, prompt_logprobs=prompt_logprobs)


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
        self._admin = admin_pb_grpc.AdapterAdminStub(self._channel)
        self._tenants = tenants_pb_grpc.TenantAdminStub(self._channel)
        self._metadata = _metadata(api_key)

    def generate(self, prompt: Prompt, adapter: str = "", timeout: float | None = None,
                 **options) -> Generation:
        """The whole generation in one answer; `options` are build_request's keyword arguments."""
        try:
            response = self._stub.Generate(build_request(prompt, adapter, **options), timeout=timeout,
                                           metadata=self._metadata)
        except grpc.RpcError as error:
            raise typed_error(error) from None
        return Generation.from_proto(response)

    def generate_stream(self, prompt: Prompt, adapter: str = "", timeout: float | None = None,
                        **options) -> Iterator[Chunk]:
        """One chunk per generated token, as the server produces them; `options` are build_request's
        keyword arguments. Leaving the loop early cancels the request on the server."""
        call = self._stub.GenerateStream(build_request(prompt, adapter, **options), timeout=timeout,
                                         metadata=self._metadata)
        try:
            for response in call:
                yield Chunk.from_proto(response)
        except grpc.RpcError as error:
            raise typed_error(error) from None
        finally:
            call.cancel()

    def server_info(self, timeout: float | None = None) -> pb.ServerInfoResponse:
        """The base model, adapters, limits and versions of the server."""
        return self._stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout, metadata=self._metadata)

    # -- adapter administration (the "admin" scope; never retried) --------------------------------

    def load_adapter(self, name: str, source: str = "", warm: bool = False,
                     timeout: float | None = None) -> admin_pb.LoadAdapterResponse:
        """Validate the adapter at `source` (an absolute folder path under the server's allowed roots, or
        "s3://BUCKET/PREFIX"; empty: the version of `name` the server's store holds and stored last, NOT_FOUND
        if none), store it, and make it the current version of `name` (created if new).
        Replacing is atomic: requests already accepted finish on the old version. `warm` also starts
        loading it into a device slot now. `.changed` is False when that content already was current.
        INVALID_ARGUMENT ("source: ..." or "name: ...") when the source or adapter is refused."""
        return self._admin.LoadAdapter(admin_pb.LoadAdapterRequest(name=name, source=source, warm=warm),
                                       timeout=timeout, metadata=self._metadata)

    def unload_adapter(self, name: str, version: str = "", wait: bool = False,
                       timeout: float | None = None) -> admin_pb.UnloadAdapterResponse:
        """Unregister `name` (every version), or only its old `version` (sha256 or a prefix of 8+ hex
        digits). While requests use it: `wait=False` refuses with FAILED_PRECONDITION and changes
        nothing; `wait=True` unregisters at once and answers when they have finished or just before
        `timeout` (then `.drained` is False and the files go when the last request ends)."""
        return self._admin.UnloadAdapter(admin_pb.UnloadAdapterRequest(name=name, version=version, wait=wait),
                                         timeout=timeout, metadata=self._metadata)

    def list_adapters(self, timeout: float | None = None) -> admin_pb.ListAdaptersResponse:
        """Every registered adapter (`.adapters`, sorted by name) with its versions, tiers and request counts."""
        return self._admin.ListAdapters(admin_pb.ListAdaptersRequest(), timeout=timeout, metadata=self._metadata)

    def describe_adapter(self, name: str, timeout: float | None = None) -> admin_pb.AdapterStatus:
        """One registered adapter's versions, tiers and request counts; NOT_FOUND if `name` is not registered."""
        return self._admin.DescribeAdapter(admin_pb.DescribeAdapterRequest(name=name), timeout=timeout,
                                           metadata=self._metadata)

    def validate_adapter(self, source: str, timeout: float | None = None) -> admin_pb.ValidateAdapterResponse:
        """Dry run of `load_adapter`: whether `source` can be loaded on this server (`.valid`; else
        `.problem` says what to change) and what it holds (`.summary`). Stores and loads nothing. A source
        outside the allowed roots is INVALID_ARGUMENT, not an invalid adapter."""
        return self._admin.ValidateAdapter(admin_pb.ValidateAdapterRequest(source=source), timeout=timeout,
                                           metadata=self._metadata)

    def pin_adapter(self, name: str, pinned: bool = True, timeout: float | None = None) -> admin_pb.AdapterStatus:
        """Keep `name`'s current version in a device slot (`pinned=False`: stop keeping it). The pin follows
        the name to new versions and survives restarts; at most (slots - 1) adapters are pinned
        (FAILED_PRECONDITION beyond)."""
        return self._admin.PinAdapter(admin_pb.PinAdapterRequest(name=name, pinned=pinned), timeout=timeout,
                                      metadata=self._metadata)

    def prefetch_adapter(self, adapter: str, timeout: float | None = None) -> admin_pb.AdapterStatus:
        """Hint that `adapter` ("NAME" or "NAME@VERSION") is used soon: the server starts loading it into
        host memory and a device slot, and answers without waiting for that."""
        return self._admin.PrefetchAdapter(admin_pb.PrefetchAdapterRequest(adapter=adapter), timeout=timeout,
                                           metadata=self._metadata)

    # -- tenant administration (the "admin" scope; never retried) ---------------------------------

    def list_tenants(self, timeout: float | None = None) -> tenants_pb.ListTenantsResponse:
        """Every tenant's and adapter's limits and usage now (`.tenants`, `.adapters`, sorted by name)."""
        return self._tenants.ListTenants(tenants_pb.ListTenantsRequest(), timeout=timeout, metadata=self._metadata)

    def reload_quotas(self, timeout: float | None = None) -> tenants_pb.ListTenantsResponse:
        """Have the server read its quotas file again and put it in force (as SIGHUP does); FAILED_PRECONDITION,
        with what is wrong, when the file is invalid (the quotas in force stay). Answers as `list_tenants`."""
        return self._tenants.ReloadQuotas(tenants_pb.ReloadQuotasRequest(), timeout=timeout, metadata=self._metadata)

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
        self._admin = admin_pb_grpc.AdapterAdminStub(self._channel)
        self._tenants = tenants_pb_grpc.TenantAdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = _metadata(api_key)

    async def generate(self, prompt: Prompt, adapter: str = "", timeout: float | None = None,
                       **options) -> Generation:
        try:
            response = await self._stub.Generate(build_request(prompt, adapter, **options), timeout=timeout,
                                                 metadata=self._metadata)
        except grpc.RpcError as error:
            raise typed_error(error) from None
        return Generation.from_proto(response)

    async def generate_stream(self, prompt: Prompt, adapter: str = "", timeout: float | None = None,
                              **options) -> AsyncIterator[Chunk]:
        call = self._stub.GenerateStream(build_request(prompt, adapter, **options), timeout=timeout,
                                         metadata=self._metadata)
        try:
            async for response in call:
                yield Chunk.from_proto(response)
        except grpc.RpcError as error:
            raise typed_error(error) from None
        finally:
            call.cancel()

    async def server_info(self, timeout: float | None = None) -> pb.ServerInfoResponse:
        return await self._stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout, metadata=self._metadata)

    async def serving(self, timeout: float | None = None) -> bool:
        """Whether the server's standard gRPC health service answers SERVING (False when it cannot be reached)."""
        try:
            answer = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def forwarding(self, authorization: str | None) -> AsyncClient:
        """This client on the same channel, sending `authorization` (an `authorization` header value, e.g.
        "Bearer KEY", or None for none) instead of its own api_key: a proxy passing on its caller's. Close
        the original client, not this view."""
        view = copy.copy(self)
        view._metadata = (("authorization", authorization),) if authorization else ()
        return view

    async def load_adapter(self, name: str, source: str = "", warm: bool = False,
                           timeout: float | None = None) -> admin_pb.LoadAdapterResponse:
        return await self._admin.LoadAdapter(admin_pb.LoadAdapterRequest(name=name, source=source, warm=warm),
                                             timeout=timeout, metadata=self._metadata)

    async def unload_adapter(self, name: str, version: str = "", wait: bool = False,
                             timeout: float | None = None) -> admin_pb.UnloadAdapterResponse:
        return await self._admin.UnloadAdapter(admin_pb.UnloadAdapterRequest(name=name, version=version, wait=wait),
                                               timeout=timeout, metadata=self._metadata)

    async def list_adapters(self, timeout: float | None = None) -> admin_pb.ListAdaptersResponse:
        return await self._admin.ListAdapters(admin_pb.ListAdaptersRequest(), timeout=timeout,
                                              metadata=self._metadata)

    async def describe_adapter(self, name: str, timeout: float | None = None) -> admin_pb.AdapterStatus:
        return await self._admin.DescribeAdapter(admin_pb.DescribeAdapterRequest(name=name), timeout=timeout,
                                                 metadata=self._metadata)

    async def validate_adapter(self, source: str, timeout: float | None = None) -> admin_pb.ValidateAdapterResponse:
        return await self._admin.ValidateAdapter(admin_pb.ValidateAdapterRequest(source=source), timeout=timeout,
                                                 metadata=self._metadata)

    async def pin_adapter(self, name: str, pinned: bool = True,
                          timeout: float | None = None) -> admin_pb.AdapterStatus:
        return await self._admin.PinAdapter(admin_pb.PinAdapterRequest(name=name, pinned=pinned), timeout=timeout,
                                            metadata=self._metadata)

    async def prefetch_adapter(self, adapter: str, timeout: float | None = None) -> admin_pb.AdapterStatus:
        return await self._admin.PrefetchAdapter(admin_pb.PrefetchAdapterRequest(adapter=adapter), timeout=timeout,
                                                 metadata=self._metadata)

    async def list_tenants(self, timeout: float | None = None) -> tenants_pb.ListTenantsResponse:
        return await self._tenants.ListTenants(tenants_pb.ListTenantsRequest(), timeout=timeout,
                                               metadata=self._metadata)

    async def reload_quotas(self, timeout: float | None = None) -> tenants_pb.ListTenantsResponse:
        return await self._tenants.ReloadQuotas(tenants_pb.ReloadQuotasRequest(), timeout=timeout,
                                                metadata=self._metadata)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
