"""Next-token choice: repetition penalty, temperature, top-k, top-p, seeded sampling, greedy."""

from __future__ import annotations

import torch

from loraplex.server.engine.sequence import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: list[list[int]], penalties: list[float]) -> torch.Tensor:
    """logits: [rows, vocab]. Tokens in `seen[row]` get logit/p if positive, logit*p if negative."""
    for row, (tokens, penalty) in enumerate(zip(seen, penalties, strict=True)):
        if penalty == 1.0 or not tokens:
            continue
        index = torch.tensor(sorted(set(tokens)), device=logits.device)
        picked = logits[row, index]
        logits[row, index] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [vocab] -> same, with tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], seen: list[list[int]],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """logits: [rows, vocab] float32 -> (token id per row, its log-probability under the raw logits).

    Greedy rows take the argmax of the penalized logits; the others sample with their own generator,
    so a seeded row's draw does not depend on the other rows of the batch.
    """
    logprobs = torch.log_softmax(logits, dim=-1)  # [rows, vocab]
    penalized = apply_repetition_penalty(logits.clone(), seen, [p.repetition_penalty for p in params])
    tokens = penalized.argmax(dim=-1).tolist()
    for row, p in enumerate(params):
        if p.greedy:
            continue
        scaled = filter_top_k_top_p(penalized[row] / p.temperature, p.top_k, p.top_p)
        probs = scaled.softmax(-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generators[row]).item())
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None]).squeeze(1)
    return tokens, chosen.tolist()
