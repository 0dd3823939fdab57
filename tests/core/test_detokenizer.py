"""Incremental detokenization: deltas never split a multi-byte character and add up to the full text."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loraplex.server.core.detokenizer import IncrementalDetokenizer
from serving_support import TOKENIZER_CORPUS


@pytest.fixture(scope="module")
def tokenizer(serving_model):
    return AutoTokenizer.from_pretrained(serving_model[0])


@pytest.mark.parametrize("text", [TOKENIZER_CORPUS[-1], TOKENIZER_CORPUS[2], "hello \U0001f600\U0001f600 world"])
def test_deltas_are_clean_and_add_up(tokenizer, text):
    prompt = tokenizer("the")["input_ids"]
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.encode()) // 4, "expect multi-byte characters to span tokens"
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detokenizer.add(token, final=i == len(ids) - 1) for i, token in enumerate(ids)]
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)
    assert "" in deltas, "some token should end inside a character and wait for the next"


def test_final_flushes_an_incomplete_character(tokenizer):
    ids = tokenizer("\U0001f600")["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert detokenizer.add(ids[0]) == ""
    assert detokenizer.add(ids[1], final=True) == tokenizer.decode(ids[:2])
