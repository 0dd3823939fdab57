"""Structured output: a request's constraint compiled into a grammar, and a matcher per request that the
engine asks for next-token bitmasks (engine.TokenConstraint).

The grammar engine is xgrammar (benchmarks/grammar_mask_cost.py: on SmolLM2's 49k vocabulary its
per-token mask costs ~12 us against llguidance's ~60-340 us). Compiled grammars are kept in a bounded LRU
keyed by the constraint, so a schema is compiled once while it is in use; matchers are per request.
The matcher's stop tokens are the model's EOS ids: EOS is allowed only where the grammar accepts, and
taking it terminates the matcher (the engine then ends the sequence with STOP).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch
import xgrammar
from transformers import PreTrainedTokenizerBase

from loraplex.server.core.calls import Constraint
from loraplex.server.core.errors import InvalidRequest

_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
"""xgrammar's "[hh:mm:ss] /path/file.cc:123: " before its error messages."""

GRAMMAR_CACHE_SIZE = 256
"""Distinct compiled constraints kept (least recently used dropped first)."""


class GrammarMatcher:
    """One request's position in its compiled grammar (engine.TokenConstraint)."""

    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        self._matcher = xgrammar.GrammarMatcher(compiled)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """bitmask: [rows, ceil(vocab / 32)] int32; row `row` gets the tokens the grammar allows next."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, token_id: int) -> None:
        """Take `token_id`; an out-of-grammar token (never sampled under the mask) is a broken contract."""
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} is outside the grammar")

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()


class Grammars:
    """Compiles constraints for one tokenizer and model vocabulary (thread-safe; bounded cache)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: tuple[int, ...],
                 cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        """The vocabulary is read on the first compile (about a second at 49k tokens), not here."""
        self._tokenizer, self._vocab_size, self._eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._cache: OrderedDict[Constraint, xgrammar.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _compiler_now(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                               stop_token_ids=list(self._eos_token_ids) or None)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        """A fresh matcher for `constraint`; InvalidRequest("constraint") naming what is wrong with it, or when
        no token of the vocabulary can start a text it allows."""
        matcher = GrammarMatcher(self.compiled(constraint))
        bitmask = xgrammar.allocate_token_bitmask(1, self._vocab_size)  # [1, ceil(vocab / 32)] int32
        matcher.fill_bitmask(bitmask, 0)
        if not bitmask.any():
            raise InvalidRequest("constraint", "no token of the model's vocabulary can start a text this "
                                 f"{constraint.kind} allows")
        return matcher

    def compiled(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        """The compiled grammar of `constraint`, from the cache when it was compiled before."""
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                return self._cache[constraint]
        compiled = self._compile(constraint)
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        kind, value, compiler = constraint.kind, constraint.value, self._compiler_now()
        try:
            if kind == "json_object":  # the builtin JSON grammar takes any JSON value, not only objects
                return compiler.compile_json_schema({"type": "object"}, any_whitespace=False)
            if kind == "json_schema":
                schema = json.loads(value)
                if not isinstance(schema, dict):
                    raise InvalidRequest("constraint", "json_schema must be a JSON object")
                return compiler.compile_json_schema(schema, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(value)
            return compiler.compile_grammar(value)
        except InvalidRequest:
            raise
        except json.JSONDecodeError as error:
            raise InvalidRequest("constraint", f"json_schema is not valid JSON: {error}") from None
        except (RuntimeError, ValueError, TypeError) as error:
            message = _LOG_PREFIX.sub("", str(error).strip()).splitlines() or [type(error).__name__]
            raise InvalidRequest("constraint", f"invalid {kind}: {message[0]}") from None
