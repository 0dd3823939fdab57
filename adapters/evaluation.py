"""Held-out evaluation of a model with or without its adapter: loss, perplexity, and a generation metric.

The generation metric compares the greedy answer to each held-out prompt with the reference answer:
exact match (after stripping whitespace) by default, or a scorer the user names as "module:function"
taking (prediction, reference) and returning a number in [0, 1]; the metric is the mean.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraplex.adapters.train_data import IGNORE_INDEX, Example, collate, pad_id

Scorer = Callable[[str, str], float]


@dataclass(frozen=True)
class Metrics:
    loss: float
    """Mean cross-entropy per answer token (nats)."""
    perplexity: float
    score: float
    """Mean generation score over the held-out prompts (exact match unless another scorer is named)."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def load_scorer(name: str) -> Scorer:
    """"exact_match", or "package.module:function" (importable where serve-train runs)."""
    if name == "exact_match":
        return exact_match
    module, _, function = name.partition(":")
    try:
        scorer = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"scorer {name!r} cannot be imported ({error}); give exact_match or module:function") from None
    if not callable(scorer):
        raise ValueError(f"scorer {name!r} is not a function")
    return scorer


@torch.no_grad()
def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
             scorer: Scorer, batch_size: int, max_new_tokens: int) -> Metrics:
    """Loss and perplexity of the answers under teacher forcing, and the scorer's mean over greedy answers."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id(tokenizer))
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]  # token t is predicted at position t - 1
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        total_loss += losses.item()
        total_tokens += int((labels != IGNORE_INDEX).sum())
    answers = generate(model, tokenizer, [e.prompt_ids for e in examples], batch_size, max_new_tokens)
    score = sum(scorer(answer, e.reference) for answer, e in zip(answers, examples, strict=True)) / len(examples)
    model.train(was_training)
    loss = total_loss / max(total_tokens, 1)
    return Metrics(loss, math.exp(min(loss, 50.0)), score)


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
             batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) to `prompts`, left-padded in batches."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        longest = max(map(len, chunk))
        input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in chunk], device=device)
        attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chunk], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                use_cache=True)
        answers += tokenizer.batch_decode(output[:, longest:], skip_special_tokens=True)
    return answers
