"""Incremental detokenization: text deltas for a growing list of generated tokens."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

#: Prompt tokens decoded along with the output, so that tokenizers whose pieces depend on the previous
#: token (SentencePiece's leading spaces) produce the same text as decoding the whole sequence.
CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """`add(token)` returns the text that token completes, "" while the text ends in an incomplete
    multi-byte character; the deltas concatenate to the decoded output (special tokens skipped)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0  # decoding ids[prefix:read] gives the text already emitted (plus context)
        self._read_offset = len(self._ids)

    def add(self, token_id: int, final: bool = False) -> str:
        """The new text of `token_id`; with `final`, also whatever incomplete text remains."""
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        if len(text) <= len(emitted) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(emitted):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
