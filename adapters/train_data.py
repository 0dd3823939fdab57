"""Training data for serve-train: JSONL files of examples, checked line by line, tokenized with loss masks.

Each line is one JSON object, either
  {"prompt": "...", "completion": "..."}   loss on the completion (and the end-of-sequence token), or
  {"messages": [{"role": ..., "content": ...}, ...]}   the model's chat template applied; loss on the
                                                        assistant messages only.
The prompt is tokenized exactly as the server tokenizes a request's text (`tokenizer(text)`, or the
chat template with a generation prompt), so what the adapter learns to continue is what it is served.
Every bad line is reported with its number and reason before anything trains (`DataError`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, system and user turns)."""
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """The data file cannot be trained on; the message lists each bad line (number and reason)."""


@dataclass(frozen=True)
class Example:
    """One training example: its prompt for evaluation, the expected answer, and the tokens with labels."""

    prompt_ids: list[int]
    """What a request sends (the prompt, or the chat up to the last assistant turn with a generation prompt)."""
    reference: str
    """The expected answer: the completion, or the last assistant message."""
    input_ids: list[int]
    """Prompt and answer tokens (the whole conversation for chat)."""
    labels: list[int]
    """`input_ids` where the loss applies, IGNORE_INDEX elsewhere."""
    chat: bool


@dataclass(frozen=True)
class Dataset:
    train: list[Example]
    eval: list[Example]
    digest: str
    """sha256 (hex) over the bytes of the training file, then the eval file if one was given."""


def load_dataset(train_file: Path, eval_file: Path | None, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 eval_fraction: float, seed: int) -> Dataset:
    """Read and tokenize `train_file` (and `eval_file`); with no eval file, hold out `eval_fraction` of the
    training examples (a seeded shuffle). Raises DataError listing every bad line of either file."""
    train, train_bytes = read_examples(train_file, tokenizer, max_length)
    if eval_file is not None:
        evaluation, eval_bytes = read_examples(eval_file, tokenizer, max_length)
    else:
        eval_bytes = b""
        shuffled = random.Random(seed).sample(train, len(train))
        held_out = max(1, round(len(train) * eval_fraction)) if eval_fraction > 0 else 0
        if len(train) - held_out < 1:
            raise DataError(f"{train_file}: {len(train)} example(s) leave none to train on after holding out "
                            f"{eval_fraction:.0%}; add examples or pass --eval-data")
        evaluation, train = shuffled[:held_out], shuffled[held_out:]
    digest = hashlib.sha256(train_bytes + eval_bytes).hexdigest()
    return Dataset(train, evaluation, digest)


def read_examples(path: Path, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[list[Example], bytes]:
    """Every line of `path` as an Example, and the file's bytes; DataError listing each bad line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from None
    examples, problems = [], []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(parse_example(json.loads(line), tokenizer, max_length))
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: not valid JSON ({error.msg} at column {error.colno})")
        except ValueError as error:
            problems.append(f"line {number}: {error}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{path} has {len(problems)} bad line(s); fix them and run again:\n  {shown}")
    if not examples:
        raise DataError(f"{path} holds no examples; write one JSON object per line")
    return examples, data


def parse_example(record: object, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Example:
    """One JSON record as an Example; ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        example = _chat_example(record["messages"], tokenizer)
    elif "prompt" in record or "completion" in record:
        example = _completion_example(record, tokenizer)
    else:
        raise ValueError('expected {"prompt", "completion"} or {"messages": [...]}')
    if len(example.input_ids) > max_length:
        raise ValueError(f"{len(example.input_ids)} tokens, above --max-length {max_length}; shorten it or raise "
                         "--max-length")
    return example


def _completion_example(record: dict, tokenizer: PreTrainedTokenizerBase) -> Example:
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('"prompt" must be a non-empty string')
    if not isinstance(completion, str) or not completion:
        raise ValueError('"completion" must be a non-empty string')
    prompt_ids = tokenizer(prompt)["input_ids"]  # as the server tokenizes a request's text
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    return Example(prompt_ids, completion, prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
                   chat=False)


def _chat_example(messages: object, tokenizer: PreTrainedTokenizerBase) -> Example:
    if not tokenizer.chat_template:
        raise ValueError("chat examples need a model with a chat template; use prompt/completion")
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise ValueError(f"message {i} must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}")
    if messages[0]["role"] == "assistant":
        raise ValueError("the conversation must start with a system or user message")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (the answer to learn)")
    input_ids = _template(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    prompt_ids: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], generation_prompt=True)
        through = _template(tokenizer, messages[: i + 1], generation_prompt=False)
        if input_ids[:len(before)] != before or input_ids[:len(through)] != through:
            raise ValueError("the chat template does not render this conversation incrementally; use "
                             "prompt/completion examples")
        labels[len(before):len(through)] = through[len(before):]
        prompt_ids = before
    return Example(prompt_ids, messages[-1]["content"], input_ids, labels, chat=True)


def _template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt,
                                              tokenize=True, return_dict=False))


def _eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def collate(examples: Sequence[Example], pad: int) -> dict[str, torch.Tensor]:
    """One right-padded batch: input_ids, attention_mask, labels `# [batch, longest]`."""
    longest = max(len(e.input_ids) for e in examples)
    padding = [longest - len(e.input_ids) for e in examples]
    return {
        "input_ids": torch.tensor([e.input_ids + [pad] * n for e, n in zip(examples, padding, strict=True)]),
        "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * n for e, n in zip(examples, padding,
                                                                                          strict=True)]),
        "labels": torch.tensor([e.labels + [IGNORE_INDEX] * n for e, n in zip(examples, padding, strict=True)]),
    }


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's padding id (its end-of-sequence id when it has none; padded positions carry no loss)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
