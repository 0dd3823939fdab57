"""Every check of a generation request, in one place, before the scheduler sees it.

`RequestChecks` refuses a `GenerateCall` with `InvalidRequest(field, problem)`, `field` being GenerateCall's
name for it (each transport renames it to its own: gRPC's trailing metadata, HTTP's `param`). The core
calls its steps in this order, so a request with several faults is refused for the first:
  1. `adapter`: the reference parsed once, into the AdapterReference that the lease takes;
  2. `prompt`: present, of a kind the model can take (a tokenizer, a chat template), not too long to
     tokenize; then the core tokenizes it;
  3. `sampling`: max_new_tokens within the server's limit, stop token ids in the vocabulary, the engine's
     bounds of every sampling field (SamplingParams);
  4. `prompt_ids`: at least one token, room left in max_model_len, ids in the vocabulary, and prompt plus
     max_new_tokens within the whole KV pool;
  5. `cache_salt`: at most MAX_CACHE_SALT_CHARS characters;
  6. `priority`: unset, "interactive" or "batch";
  7. `constraint`: the call's (or the adapter's default) constraint compiles (core/grammar.py), on a model
     with a tokenizer; the compiled grammar's matcher goes into the Request.
The engine still asserts its own contracts (Engine.add_sequence, SamplingParams) with ValueError; a checked
request never trips them.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from loraplex.adapters.reference import AdapterReference
from loraplex.server.core.adapter_runtime.leases import BASE_MODEL, BASE_REFERENCE
from loraplex.server.core.adapter_runtime.state import checked_reference
from loraplex.server.core.calls import ChatMessage, Constraint, EngineFacts, GenerateCall
from loraplex.server.core.errors import InvalidRequest
from loraplex.server.core.grammar import GrammarMatcher, Grammars
from loraplex.server.core.quota_config import PRIORITIES, Priority
from loraplex.server.core.requests import RequestLimits
from loraplex.server.engine import InvalidSamplingParameter, SamplingParams

MAX_CHARS_PER_POSITION = 32
"""A text prompt (or a conversation's contents together) longer than this many characters per position of
the model's max_model_len is refused before it is tokenized: no tokenizer averages that many characters
per token, so it could not fit anyway."""

MAX_CACHE_SALT_CHARS = 256
"""Longest prefix-cache salt a request may send (it is hashed into every block key of the request)."""

Prompt = str | list[int] | list[ChatMessage]
"""A prompt as it goes to the tokenizer: text, token ids (used as they are), or a conversation (chat template)."""


@dataclass(frozen=True)
class RequestChecks:
    """The checks of one server: its request limits and its engine's shape."""

    limits: RequestLimits
    engine: EngineFacts

    def adapter(self, adapter: str) -> AdapterReference:
        """The parsed reference ("" is the base model: BASE_REFERENCE); InvalidRequest("adapter") if malformed."""
        return BASE_REFERENCE if adapter == BASE_MODEL else checked_reference(adapter)

    def prompt(self, call: GenerateCall, tokenizer: PreTrainedTokenizerBase | None) -> Prompt:
        """The call's prompt as it goes to the tokenizer (text with `chat` becomes one user message): refused
        when empty, when it needs a tokenizer (or a chat template) the model folder lacks, and text longer than
        MAX_CHARS_PER_POSITION * max_model_len characters (before it is tokenized)."""
        prompt = call.prompt
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "must not be empty")
            if call.chat:
                prompt = [ChatMessage("user", prompt)]
        elif call.chat:
            raise InvalidRequest("chat", "chat templating needs text input")
        if not prompt:
            raise InvalidRequest("prompt", "must not be empty")
        if not isinstance(prompt, str) and not isinstance(prompt[0], ChatMessage):
            return list(prompt)
        if tokenizer is None:
            raise InvalidRequest("prompt", "this model folder has no tokenizer; send token ids")
        chars = len(prompt) if isinstance(prompt, str) else sum(len(m.content) for m in prompt)
        limit = MAX_CHARS_PER_POSITION * self.engine.max_model_len
        if chars > limit:
            raise InvalidRequest("prompt", f"{chars} characters is more than this model's max_model_len can hold "
                                 f"(at most {limit} characters are tokenized)")
        if not isinstance(prompt, str) and not tokenizer.chat_template:
            field = "chat" if call.chat else "messages"
            raise InvalidRequest(field, "this model has no chat template; send plain text")
        return prompt if isinstance(prompt, str) else list(prompt)

    def sampling(self, call: GenerateCall) -> SamplingParams:
        """The call's SamplingParams (max_new_tokens None: the server's default), within the request limits."""
        max_new_tokens = self.limits.default_max_new_tokens if call.max_new_tokens is None else call.max_new_tokens
        limit = self.limits.max_new_tokens_limit
        if not 1 <= max_new_tokens <= limit:
            raise InvalidRequest("max_new_tokens", f"{max_new_tokens} is outside [1, {limit}] (this server's limit)")
        vocab_size = self.engine.vocab_size
        if any(not 0 <= t < vocab_size for t in call.stop_token_ids):
            raise InvalidRequest("stop_token_ids", f"token ids must lie in [0, {vocab_size})")
        try:
            return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=call.stop_token_ids,
                                  ignore_eos=call.ignore_eos, top_logprobs=call.top_logprobs,
                                  prompt_logprobs=call.prompt_logprobs, **call.sampling)
        except InvalidSamplingParameter as error:
            raise InvalidRequest(error.field, str(error)) from None

    def prompt_ids(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        """InvalidRequest("prompt") unless the tokenized prompt holds a token, leaves room in max_model_len and
        lies in the vocabulary; InvalidRequest("max_new_tokens") when prompt plus max_new_tokens (up to
        max_model_len) would need more KV blocks than the whole pool holds, so it could never run."""
        engine = self.engine
        if not prompt_ids:
            raise InvalidRequest("prompt", "prompt must hold at least one token")
        if len(prompt_ids) >= engine.max_model_len:
            raise InvalidRequest("prompt", f"prompt of {len(prompt_ids)} tokens leaves no room in "
                                 f"max_model_len={engine.max_model_len}")
        if any(not 0 <= t < engine.vocab_size for t in prompt_ids):
            raise InvalidRequest("prompt", f"prompt token ids must lie in [0, {engine.vocab_size})")
        needed = engine.blocks_for(min(len(prompt_ids) + sampling.max_new_tokens, engine.max_model_len))
        if needed > engine.kv_blocks:
            raise InvalidRequest("max_new_tokens", f"prompt plus max_new_tokens needs {needed} KV blocks; "
                                 f"the whole cache holds {engine.kv_blocks}: ask for fewer tokens")

    def cache_salt(self, call: GenerateCall) -> str:
        """The call's prefix-cache salt; InvalidRequest("cache_salt") when longer than MAX_CACHE_SALT_CHARS."""
        if len(call.cache_salt) > MAX_CACHE_SALT_CHARS:
            raise InvalidRequest("cache_salt", f"{len(call.cache_salt)} characters is more than "
                                 f"{MAX_CACHE_SALT_CHARS}")
        return call.cache_salt

    def priority(self, call: GenerateCall) -> Priority:
        """The class the call asks for ("interactive" when unset: its tenant's class then decides, see
        Scheduler.submit); InvalidRequest("priority") for anything but the PRIORITIES."""
        if call.priority is None:
            return "interactive"
        if call.priority not in PRIORITIES:
            raise InvalidRequest("priority", f"{call.priority!r} is not one of {', '.join(PRIORITIES)}")
        return call.priority

    def constraint(self, constraint: Constraint | None, grammars: Grammars | None) -> GrammarMatcher | None:
        """A matcher for `constraint` (the call's, or the adapter's default; None: free generation);
        InvalidRequest("constraint") when the model has no tokenizer (`grammars` None) or it does not compile,
        naming the problem. Compiling can take tens of milliseconds: call it off the event loop."""
        if constraint is None:
            return None
        if grammars is None:
            raise InvalidRequest("constraint", "this model folder has no tokenizer, which constraints need")
        return grammars.matcher(constraint)
