"""The core's calls and answers, as every transport speaks to it: a decoded `GenerateCall` in, one
`GeneratedToken` per generated token out (the last one with its `Completion`), and the read-outs
`ModelList` and `ServerFacts`. No wire format, no tensors. A token's candidates (`TokenLogprob`) and the
`Completion` are the records the client reads too (client/records.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from loraplex.client.records import Completion, Token
from loraplex.server.core.quotas import QuotaStatus


class StopGeneration(Exception):
    """Thrown into `generate` by a caller that met its own stop condition (e.g. an HTTP stop string)."""



ConstraintKind = Literal["json_schema", "regex", "grammar", "json_object"]
"""As client.codec.CONSTRAINT_KINDS names them."""


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match. `value`: the JSON schema as JSON text (json_schema), a regular
    expression (regex), an EBNF grammar in the GBNF dialect with a `root` rule (grammar); "" for
    json_object (any JSON object)."""

    kind: ConstraintKind
    value: str = ""


@dataclass(frozen=True)
class Tool:
    """A function the model may call (OpenAI's tools[].function): `parameters` is its arguments' JSON
    schema as JSON text."""

    name: str
    description: str = ""
    parameters: str = "{}"


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool: its name and the arguments as JSON text (an object)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    """An assistant message's calls (core/tools.py renders them)."""
    tool_call_id: str | None = None
    """A "tool" message: the call it answers."""



@dataclass(frozen=True)
class GenerateCall:
    """One generation request as a transport decodes it (field names are SamplingParams' where shared)."""

    adapter: str
    """"NAME", "NAME@VERSION", "" or the base model's name (both mean the base model alone)."""
    prompt: str | Sequence[int] | Sequence[ChatMessage]
    """Text (tokenized here), token ids (used as they are) or a conversation (chat template)."""
    chat: bool = False
    """Wrap text as one user message in the chat template."""
    max_new_tokens: int | None = None
    """None takes the server's default_max_new_tokens."""
    sampling: Mapping[str, float | int] = field(default_factory=dict)
    """SamplingParams fields the caller set: temperature, top_k, top_p, repetition_penalty, seed,
    presence_penalty, frequency_penalty."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    """Report each token's log-probability and its text alone (GeneratedToken.logprob, piece)."""
    top_logprobs: int = 0
    """Also report this many most likely tokens of each step, in [0, engine.MAX_TOP_LOGPROBS]."""
    cache_salt: str = ""
    """Share prefix-cache blocks only with requests of the same salt ("" shares with every unsalted one)."""
    priority: str | None = None
    """"interactive" or "batch" (quota_config.PRIORITIES); None takes the tenant's class."""
    constraint: Constraint | None = None
    """Structured output: what the generated text must match (core/grammar.py); None takes the adapter's
    default constraint (its card's), if any, else generation is free."""
    prompt_logprobs: bool = False
    """Also report every prompt token's log-probability (GeneratedToken.prompt_logprobs, first token)."""
    tools: tuple[Tool, ...] = ()
    """Functions a conversation's model may call, rendered into the prompt (core/tools.py)."""



@dataclass(frozen=True)
class GeneratedToken(Token):
    """One generated token (the client's `Token`: its id, the text it adds, and logprobs only when
    GenerateCall asked), with the completion on the last one."""

    completion: Completion | None = None
    prompt_tokens: int = 0
    """Tokens in the prompt, on the first token of a generation (0 on the others)."""
    cached_tokens: int = 0
    """Of those, tokens found in the prefix cache, on the first token (0 on the others)."""
    prompt_logprobs: tuple[Token, ...] | None = None
    """With GenerateCall.prompt_logprobs, on the first token: each prompt token (text = piece), its logprob
    given the tokens before it (None for the first) and its top_logprobs alternatives."""


@dataclass(frozen=True)
class ModelList:
    """What a caller may name: the base model (None when its key may not use it) and (adapter, version)s."""

    base: str | None
    adapters: list[tuple[str, str]]


@dataclass(frozen=True)
class AdapterFacts:
    name: str
    version: str
    """Content digest of its current version."""
    rank: int
    """Rank of the current version (0 if its stored files no longer validate)."""


@dataclass(frozen=True)
class ServerFacts:
    """What ServerInfo reports: the base model, the limits, and the adapters a caller may use."""

    model_name: str
    architecture: str
    vocab_size: int
    max_model_len: int
    has_tokenizer: bool
    has_chat_template: bool
    max_new_tokens_limit: int
    default_max_new_tokens: int
    max_running: int
    max_waiting: int
    adapter_slots: int
    max_adapter_rank: int
    adapters: list[AdapterFacts]
    tenant: QuotaStatus | None = None
    """The caller's tenant: its limits and usage."""


@dataclass(frozen=True)
class EngineFacts:
    """The engine's fixed shape, as the layers above read it."""

    architecture: str
    vocab_size: int
    max_model_len: int
    adapter_slots: int
    max_adapter_rank: int
    kv_block_size: int
    """Token positions per KV block."""
    kv_blocks: int
    """Blocks in the whole KV pool."""
    eos_token_ids: tuple[int, ...] = ()
    """The model's end-of-sequence ids (a constrained output may end with one only where its grammar accepts)."""

    def blocks_for(self, positions: int) -> int:
        """KV blocks that one sequence of `positions` token positions holds."""
        return -(-positions // self.kv_block_size)
