"""Per-sequence state and the engine's input/output records (token ids only, no text)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

import torch

from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.prefix_cache import BlockChain

MAX_TOP_LOGPROBS = 20
"""Most alternatives one request may ask for per token (OpenAI's limit)."""


class InvalidSamplingParameter(ValueError):
    """A SamplingParams field out of its bounds; `field` names it."""

    def __init__(self, field: str, value: object) -> None:
        super().__init__(f"invalid sampling parameter {field}={value!r}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen and when a sequence stops."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL-style, as transformers)."""
    presence_penalty: float = 0.0
    """In [-2, 2] (OpenAI's): subtracted once from the logit of every token already generated (output
    only, not the prompt); > 0 favours new tokens."""
    frequency_penalty: float = 0.0
    """In [-2, 2] (OpenAI's): subtracted from each token's logit once per time it was generated so far
    (output only, not the prompt); > 0 discourages verbatim repetition."""
    top_logprobs: int = 0
    """In [0, 20]: report this many most likely (token id, logprob) alternatives with every token."""
    seed: int | None = None
    """Same seed, same prompt, same adapter -> same output, whatever else is in the batch."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    prompt_logprobs: bool = False
    """Also report the log-probability of every prompt token after the first (and the top_logprobs most
    likely alternatives at each position), computed during prefill; such a sequence never starts from the
    prefix cache, whose blocks hold no logits."""

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0.0,
            "top_k": self.top_k >= 0,
            "top_p": 0.0 < self.top_p <= 1.0,
            "repetition_penalty": self.repetition_penalty > 0.0,
            "presence_penalty": -2.0 <= self.presence_penalty <= 2.0,
            "frequency_penalty": -2.0 <= self.frequency_penalty <= 2.0,
            "top_logprobs": 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InvalidSamplingParameter(bad[0], getattr(self, bad[0]))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class FinishReason(enum.Enum):
    STOP = "stop"
    """EOS or a stop token was produced (it is the last event's token)."""
    LENGTH = "length"
    """max_new_tokens or the model's context length was reached."""
    DEAD_END = "dead_end"
    """Its constraint allows no token of the model's vocabulary here: the sequence ends without a token this
    step (the event's token_id is -1), so only this sequence fails, not the step."""


class TokenConstraint(Protocol):
    """A per-sequence rule over the next token, in token ids only (server/core/grammar.py implements it with
    a grammar matcher). The engine asks for the allowed set before each sample of the sequence, possibly on
    another thread while the forward pass runs, then tells it the chosen token."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """bitmask: [rows, ceil(vocab / 32)] int32; set row `row`: bit j of word i is 1 iff token 32 * i + j
        may come next (every other row is left alone)."""

    def advance(self, token_id: int) -> None:
        """The sequence took `token_id` (one the last bitmask allowed)."""

    @property
    def terminated(self) -> bool:
        """Whether the rule is complete and allows nothing more: the sequence then stops (STOP)."""


@dataclass(frozen=True)
class PromptLogprob:
    """The log-probability of one prompt token given those before it, with the most likely alternatives."""

    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """(token id, logprob) pairs, most likely first; as many as the sampling's top_logprobs."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one sequence."""

    seq_id: int
    token_id: int
    logprob: float
    """Log-probability of the token under the model's (unprocessed) distribution."""
    finish_reason: FinishReason | None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """The sampling's `top_logprobs` most likely (token id, logprob) pairs of this step's unprocessed
    distribution, most likely first; empty when it asked for none."""
    prompt_logprobs: tuple[PromptLogprob, ...] | None = None
    """On a sequence's first event when its sampling asked (prompt_logprobs): one entry per prompt token
    after the first (the first has no context to be predicted from); None otherwise."""


@dataclass(eq=False)
class SequenceState:
    """One sequence's state across steps; the engine owns its KV blocks while it runs."""

    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    slot: int = NO_ADAPTER
    """Device adapter slot, or NO_ADAPTER for the base model."""
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose keys/values are in the cache."""
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    chain: BlockChain | None = None
    """Keys of its full blocks in the prefix cache; None keeps it out of the cache (nothing reused or offered)."""
    constraint: TokenConstraint | None = None
    """Which tokens it may take next (structured output); None: any."""
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)
    """Filled during prefill when sampling.prompt_logprobs: entry i for prompt token i + 1."""

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
