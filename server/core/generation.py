"""Transport-neutral generation: from a decoded request to generated tokens with their text.

Both transports decode their wire format into a `GenerateCall` and iterate
`GenerationCore.generate(authorization, call)`, which authenticates (scope "inference" and the key's
adapter allow-list), finds the key's tenant (core/quota_config.py), checks the request
(server/core/validation.py, the one place), tokenizes (text, or a conversation through the tokenizer's chat
template), submits a plain `Request` to the scheduler (which may refuse it over a quota), and
yields one `GeneratedToken` per generated token with its incremental text; the last one carries the
`Completion`. Refusals are raised (server/core/errors.py) before the first token. The HTTP shim in front
of a remote server (server/api/remote_backend.py) yields the same records from gRPC, so its code does
not depend on where the model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from loraplex.adapters.reference import AdapterReference
from loraplex.client.records import Completion, FinishReason, Token, TokenLogprob
from loraplex.server.core.adapter_runtime.admin import request_errors
from loraplex.server.core.adapter_runtime.manager import AdapterManager
from loraplex.server.core.auth import Authenticator, Principal, Scope
from loraplex.server.core.calls import (
    AdapterFacts,
    ChatMessage,
    Constraint,
    GenerateCall,
    GeneratedToken,
    ModelList,
    ServerFacts,
    StopGeneration,
    Tool,
)
from loraplex.server.core.detokenizer import IncrementalDetokenizer
from loraplex.server.core.errors import AdapterNotFound, GenerationFailed, Overloaded, RequestError
from loraplex.server.core.grammar import Grammars
from loraplex.server.core.metrics import REFUSED_LABEL, UNKNOWN_LABEL, ServerMetrics
from loraplex.server.core.requests import Request, RequestLimits, RequestStream
from loraplex.server.core.scheduler import Scheduler
from loraplex.server.core.tools import conversation, function_spec, template_knows_tools
from loraplex.server.core.validation import Prompt, RequestChecks
from loraplex.server.engine import PromptLogprob, TokenEvent
from loraplex.server.engine.cpu_threads import single_threaded

log = logging.getLogger("loraplex.requests")

TOKENIZE_WORKERS = 2
"""Threads that tokenize, apply chat templates and compile constraints, off the event loop."""

T = TypeVar("T")


def check_finite(event: TokenEvent) -> None:
    """GenerationFailed unless the event's log-probabilities are finite (NaN or infinite logits, e.g. from a
    broken adapter, must not reach the wire: JSON has no NaN); the one such check, per generated token."""
    if not (math.isfinite(event.logprob) and all(math.isfinite(logprob) for _, logprob in event.top_logprobs)):
        raise GenerationFailed("the model produced non-finite values (NaN or infinity) for this request; "
                               "its adapter or the base weights are broken")


class GenerationCore:
    """Generation for every transport, over one scheduler and the model's tokenizer (None: ids only)."""

    def __init__(self, scheduler: Scheduler, adapters: AdapterManager, tokenizer: PreTrainedTokenizerBase | None,
                 auth: Authenticator, limits: RequestLimits, model_name: str, metrics: ServerMetrics | None = None,
                 log_prompts: bool = False) -> None:
        """`adapters` is the scheduler's adapter runtime (listings and admin calls); `metrics` (None: off)
        records every request; `log_prompts` adds the prompt to its log line."""
        self.scheduler, self.adapters, self.tokenizer, self.auth = scheduler, adapters, tokenizer, auth
        self.engine = scheduler.engine_facts()
        self.limits, self.model_name = limits, model_name
        self.checks = RequestChecks(limits, self.engine)
        self.grammars = None if tokenizer is None else Grammars(tokenizer, self.engine.vocab_size,
                                                                self.engine.eos_token_ids)
        self.metrics, self.log_prompts = metrics, log_prompts
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tokenizing = ThreadPoolExecutor(TOKENIZE_WORKERS, thread_name_prefix="loraplex-tokenize",
                                              initializer=single_threaded)

    def authorize(self, authorization: str | None, scope: Scope = "inference") -> Principal:
        """The caller, if it has `scope` (Authenticator.authorize)."""
        return self.auth.authorize(authorization, scope)

    async def generate(self, authorization: str | None, call: GenerateCall) -> AsyncIterator[GeneratedToken]:
        """Authorize, check, tokenize, submit; then one GeneratedToken per generated token. Throwing StopGeneration
        in ends the request as finished (the caller met its own stop condition); closing the iterator
        early (the caller went away) cancels it. Either frees its sequence. Every request ends with one
        log line (and its metrics): adapter, outcome, token counts, time to first token, duration."""
        with self._tracked():  # from the first look at the call: drain() waits for it
            arrival, token_times = time.perf_counter(), []
            adapter = "" if call.adapter == self.model_name else call.adapter
            outcome, prompt_ids = "cancelled", []
            try:
                principal = self.authorize(authorization)
                reference = self.checks.adapter(adapter)
                principal.require_adapter(reference.name)
                prompt_ids = await self.prompt_ids(self.checks.prompt(call, self.tokenizer), call.tools)
                sampling = self.checks.sampling(call)
                self.checks.prompt_ids(prompt_ids, sampling)
                cache_salt, priority = self.checks.cache_salt(call), self.checks.priority(call)
                constraint = await self._off_loop(lambda: self.checks.constraint(
                    call.constraint or self._card_constraint(reference), self.grammars))
                tenant = self.scheduler.tenant_of(principal.name)
                stream = self._submit(Request(reference, prompt_ids, sampling, cache_salt, tenant, priority,
                                              constraint))
            except RequestError as error:
                label = UNKNOWN_LABEL if isinstance(error, AdapterNotFound) else REFUSED_LABEL
                self._ended(adapter, label, "refused", call, prompt_ids, token_times, arrival)
                raise
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer else None
            try:
                async for event in stream:
                    check_finite(event)
                    token_times.append(time.perf_counter())
                    final = event.finish_reason is not None
                    text = detokenizer.add(event.token_id, final) if detokenizer else ""
                    completion = Completion(FinishReason(event.finish_reason.value), len(prompt_ids), len(token_times),
                                            stream.lease.name, stream.lease.version,
                                            stream.cached_tokens) if final else None
                    if final:
                        outcome = event.finish_reason.value
                    token = self._token(call, event, text, completion)
                    if len(token_times) == 1:
                        token = replace(token, prompt_tokens=len(prompt_ids), cached_tokens=stream.cached_tokens,
                                        prompt_logprobs=self._prompt_tokens(prompt_ids, event.prompt_logprobs))
                    try:
                        yield token
                    except StopGeneration:
                        outcome = "stop"
                        return
            except GenerationFailed:
                outcome = "error"
                raise
            except RequestError:  # accepted, then refused (shutting down, adapter files unloadable)
                outcome = "refused"
                raise
            except Exception:
                outcome = "error"
                raise
            finally:  # done, or the caller went away (cancel, deadline, disconnect): free the sequence
                stream.cancel()
                self._ended(adapter, stream.lease.name, outcome, call, prompt_ids, token_times, arrival)
                if self.metrics is not None:
                    wait = stream.queue_wait_s
                    served = (len(prompt_ids) if wait is not None else 0) + len(token_times)
                    self.metrics.record_tenant_request(tenant, served, wait)

    def _submit(self, request: Request) -> RequestStream:
        """`scheduler.submit`, with the tenant's admission or refusal (Overloaded: by which limit) in the metrics."""
        try:
            stream = self.scheduler.submit(request)
        except Overloaded as error:
            if self.metrics is not None:
                self.metrics.record_submit(request.tenant, error.limit)
            raise
        if self.metrics is not None:
            self.metrics.record_submit(request.tenant, None)
        return stream

    async def exposition(self, authorization: str | None) -> bytes:
        """The Prometheus text of every metric, for a caller with scope "metrics" or "admin"."""
        self.auth.authorize(authorization, "metrics", "admin")
        return await asyncio.to_thread(self.metrics.exposition)  # reads adapter state under its lock

    async def ready(self) -> bool:
        """Whether requests are taken (the model is loaded and the server is not draining)."""
        return self.scheduler.accepting

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no `generate` is in flight (True), or at most `timeout_s` seconds (False). Call it after
        `scheduler.stop_accepting()`, so that no new one starts generating."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """Count one generation in flight while the block runs."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def models(self, authorization: str | None) -> ModelList:
        """The base model (if the caller's key may use it) and every adapter it may use."""
        principal = self.authorize(authorization)
        statuses = await asyncio.to_thread(self.adapters.statuses)  # may read stored files
        return ModelList(self.model_name if principal.may_use("") else None,
                         [(status.name, status.current) for status in statuses if principal.may_use(status.name)])

    async def server_facts(self, authorization: str | None) -> ServerFacts:
        """The base model, the limits, the adapters the caller's key may use and its tenant (scope "inference")."""
        principal = self.authorize(authorization)
        statuses = await asyncio.to_thread(self.adapters.statuses)  # may read stored files
        engine, tokenizer, config = self.engine, self.tokenizer, self.scheduler.config
        tenant = self.scheduler.tenant_status(self.scheduler.tenant_of(principal.name))
        return ServerFacts(
            self.model_name, engine.architecture, engine.vocab_size, engine.max_model_len, tokenizer is not None,
            bool(tokenizer is not None and tokenizer.chat_template), self.limits.max_new_tokens_limit,
            self.limits.default_max_new_tokens, config.max_running, config.max_waiting, engine.adapter_slots,
            engine.max_adapter_rank,
            [AdapterFacts(status.name, status.current, status.current_rank())
             for status in statuses if principal.may_use(status.name)], tenant)

    async def load_adapter(self, authorization: str | None, name: str, source: str) -> str:
        """Register `source` under `name` (scope "admin"); its version."""
        self.authorize(authorization, "admin")
        adapters = self.adapters
        with request_errors():
            _, summary, _ = await adapters.run_admin(adapters.load, source, name)
        return summary.digest

    async def unload_adapter(self, authorization: str | None, name: str) -> list[str]:
        """Unregister every version of `name` now, refusing while one is in use (scope "admin"); the
        versions removed."""
        self.authorize(authorization, "admin")
        adapters = self.adapters
        with request_errors():
            removed, _ = await adapters.run_admin(adapters.unload, name)
        return list(removed)

    async def prompt_ids(self, prompt: Prompt, tools: tuple[Tool, ...] = ()) -> list[int]:
        """The token ids of a checked prompt (RequestChecks.prompt): ids as given, text tokenized, a
        conversation through the chat template (with `tools` as core/tools.py renders them); on the core's
        tokenizer threads, so a long prompt delays no other request."""
        tokenizer = self.tokenizer
        if isinstance(prompt, str):
            return await self._off_loop(lambda: tokenizer(prompt)["input_ids"])
        if not isinstance(prompt[0], ChatMessage):
            return prompt
        native = template_knows_tools(tokenizer.chat_template)
        messages = conversation(prompt, tools, native)
        options = {"tools": [function_spec(t) for t in tools]} if tools and native else {}
        return list(await self._off_loop(lambda: tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, **options)))

    async def _off_loop(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work)

    def close(self) -> None:
        """Stop the tokenizer threads (after the drain: no request is being tokenized any more)."""
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    def _ended(self, adapter: str, label: str, outcome: str, call: GenerateCall, prompt_ids: list[int],
               token_times: list[float], arrival: float) -> None:
        """Metrics and the log line of one ended request: `adapter` as the caller named it, `label` the
        adapter it ran on ("" for the base) or REFUSED_LABEL / UNKNOWN_LABEL when it was refused first."""
        if self.metrics is not None:
            self.metrics.record_request(label, outcome, len(prompt_ids), token_times, arrival)
        fields = {"adapter": adapter, "outcome": outcome, "prompt_tokens": len(prompt_ids),
                  "generated_tokens": len(token_times),
                  "ttft_s": round(token_times[0] - arrival, 6) if token_times else None,
                  "duration_s": round(time.perf_counter() - arrival, 6)}
        if self.log_prompts:
            fields["prompt"] = call.prompt if isinstance(call.prompt, str) else [
                m.__dict__ if isinstance(m, ChatMessage) else m for m in call.prompt]
        log.info("request %s", " ".join(f"{key}={value}" for key, value in fields.items()), extra={"fields": fields})

    def _token(self, call: GenerateCall, event: TokenEvent, text: str, completion: Completion | None,
               ) -> GeneratedToken:
        if not (call.logprobs or call.top_logprobs):
            return GeneratedToken(event.token_id, text, None, completion=completion)
        top = tuple(TokenLogprob(token_id, self._piece(token_id), logprob) for token_id, logprob in event.top_logprobs)
        return GeneratedToken(event.token_id, text, event.logprob if call.logprobs else None,
                              self._piece(event.token_id), top, completion)

    def _card_constraint(self, reference: AdapterReference) -> Constraint | None:
        """The default constraint of the adapter's card (adapter_runtime/cards.py), for a call that sets none."""
        default = self.adapters.default_constraint(reference)
        return None if default is None else Constraint(*default)

    def _prompt_tokens(self, prompt_ids: list[int], logprobs: tuple[PromptLogprob, ...] | None,
                       ) -> tuple[Token, ...] | None:
        """The prompt as Tokens (text = piece) with the engine's prompt logprobs: the first has none."""
        if logprobs is None:
            return None
        first = self._piece(prompt_ids[0])
        tokens = [Token(prompt_ids[0], first, None, first)]
        for token_id, entry in zip(prompt_ids[1:], logprobs, strict=True):
            piece = self._piece(token_id)
            top = tuple(TokenLogprob(top_id, self._piece(top_id), logprob) for top_id, logprob in entry.top_logprobs)
            tokens.append(Token(token_id, piece, entry.logprob, piece, top))
        return tuple(tokens)

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
