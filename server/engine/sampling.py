"""Next-token choice: repetition, presence and frequency penalties, temperature, top-k, top-p, seeded
sampling, greedy; the chosen token's log-probability and the most likely alternatives."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from loraplex.server.engine.sequence import SequenceState


class Sampled(NamedTuple):
    """`sample`'s choice for each row of the batch, on the host (one entry per row)."""

    tokens: list[int]
    logprobs: list[float]
    """Log-probability of each chosen token under the unprocessed distribution (log_softmax(logits))."""
    top_logprobs: list[tuple[tuple[int, float], ...]]
    """Per row, its sampling's `top_logprobs` most likely (token id, logprob) pairs of the unprocessed
    distribution, most likely first; () for rows that asked for none."""
    dead_ends: frozenset[int] = frozenset()
    """Constrained rows whose bitmask allows no token of the vocabulary (their `tokens` entry means nothing)."""


def apply_repetition_penalty(logits: torch.Tensor, seen: list[list[int]], penalties: list[float]) -> torch.Tensor:
    """logits: [rows, vocab]. Tokens in `seen[row]` get logit/p if positive, logit*p if negative."""
    for row, (tokens, penalty) in enumerate(zip(seen, penalties, strict=True)):
        if penalty == 1.0 or not tokens:
            continue
        index = torch.tensor(sorted(set(tokens)), device=logits.device)
        picked = logits[row, index]
        logits[row, index] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def apply_presence_frequency_penalties(logits: torch.Tensor, generated: list[list[int]], presence: list[float],
                                       frequency: list[float]) -> torch.Tensor:
    """logits: [rows, vocab], changed in place. OpenAI's penalties over each row's generated tokens:

        logits[row, j] -= frequency[row] * count[row, j] + presence[row] * (count[row, j] > 0)

    where count[row, j] is how often token j occurs in generated[row]. Rows with both penalties 0 or
    nothing generated yet cost nothing; the others are counted together on the logits' device.
    """
    rows = [row for row, (tokens, p, f) in enumerate(zip(generated, presence, frequency, strict=True))
            if tokens and (p != 0.0 or f != 0.0)]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[1]
    lengths = [len(generated[row]) for row in rows]
    token_ids = torch.tensor(list(itertools.chain.from_iterable(generated[row] for row in rows)),
                             device=device)  # [total]
    local_rows = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                         torch.tensor(lengths, device=device), output_size=sum(lengths))  # [total]
    counts = torch.zeros(len(rows), vocab, dtype=logits.dtype, device=device)  # [penalized rows, vocab]
    counts.view(-1).index_add_(0, local_rows * vocab + token_ids, torch.ones_like(token_ids, dtype=logits.dtype))
    coefficients = torch.tensor([[frequency[row], presence[row]] for row in rows], dtype=logits.dtype,
                                device=device)  # [penalized rows, 2]
    penalty = counts * coefficients[:, :1] + (counts > 0) * coefficients[:, 1:]  # [penalized rows, vocab]
    return logits.index_add_(0, torch.tensor(rows, device=device), penalty, alpha=-1)


NUCLEUS_CANDIDATES = 256


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [vocab] -> same, with tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = logits.masked_fill(_outside_nucleus(logits, top_p), float("-inf"))
    return logits


def _outside_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits: [vocab] -> [vocab] bool, True for tokens outside the top-p nucleus: the most likely tokens
    whose probability before them (in descending order) is below top_p stay, so the one that crosses
    top_p stays too. Only the NUCLEUS_CANDIDATES most likely tokens are ranked (growing 4x while they do
    not reach top_p): a full sort of a 49k vocabulary costs ~5 ms per row on CPU, top-256 ~0.3 ms."""
    vocab = logits.numel()
    log_normalizer = torch.logsumexp(logits, -1)
    candidates = min(NUCLEUS_CANDIDATES, vocab)
    while True:
        top_logits, order = torch.topk(logits, candidates)  # [candidates], most likely first
        probs = (top_logits - log_normalizer).exp()
        cumulative = probs.cumsum(-1)
        if candidates == vocab or cumulative[-1] >= top_p:  # the nucleus lies within the candidates
            break
        candidates = min(4 * candidates, vocab)
    outside = torch.ones_like(logits, dtype=torch.bool)
    outside[order[cumulative - probs < top_p]] = False
    return outside


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs: [vocab] (sums to ~1) -> one token id drawn from it, as a 0-d tensor: inverse-CDF with one
    uniform number from `generator`. Same distribution as torch.multinomial(probs, 1), which costs about
    1.6 ms per row on CPU at a 49k vocabulary (this: ~0.05 ms); zero-probability tokens are never drawn."""
    cumulative = probs.cumsum(-1)  # [vocab]
    threshold = torch.rand(1, generator=generator, device=probs.device) * cumulative[-1]  # [1]
    return torch.searchsorted(cumulative, threshold, right=True).clamp_(max=probs.numel() - 1)[0]


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask: [rows, ceil(vocab / 32)] int32 (bit j of word i: token 32 * i + j) -> [rows, vocab] bool."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    return ((bitmask[:, :, None] >> bits) & 1).bool().reshape(bitmask.shape[0], -1)[:, :vocab]


def sample(logits: torch.Tensor, seqs: Sequence[SequenceState],
           bitmask: tuple[list[int], torch.Tensor] | None = None) -> Sampled:
    """logits: [rows, vocab] float32, row i being the next-token logits of seqs[i] -> the chosen tokens.

    `bitmask` (rows, [len(rows), ceil(vocab / 32)] int32): the constrained rows and their allowed tokens
    (TokenConstraint.fill_bitmask); their disallowed tokens get -inf before anything else, other rows are
    untouched. The logits used for choosing then get, in order: the repetition penalty (over prompt and
    output), the presence and frequency penalties (over the output only), then, for sampled rows,
    temperature, top-k and top-p. Greedy rows take the argmax of the penalized logits; the others sample with
    their own generator, so a seeded row's draw does not depend on the other rows of the batch.
    Reported log-probabilities (chosen and top alternatives) are those of the unprocessed logits.
    `seqs` is only read.
    """
    params = [s.sampling for s in seqs]
    logprobs = torch.log_softmax(logits, dim=-1)  # [rows, vocab]
    penalized = logits.clone()
    if bitmask is not None:
        rows, bits = bitmask
        index = torch.tensor(rows, device=logits.device)
        allowed = allowed_tokens(bits.to(logits.device), logits.shape[1])  # [constrained rows, vocab]
        penalized[index] = penalized[index].masked_fill(~allowed, float("-inf"))
        dead_ends = frozenset(rows[i] for i in (~allowed.any(dim=1)).nonzero().flatten().tolist())
    else:
        dead_ends = frozenset()
    penalized = apply_repetition_penalty(
        penalized, [s.token_ids if s.sampling.repetition_penalty != 1.0 else [] for s in seqs],
        [p.repetition_penalty for p in params])
    penalized = apply_presence_frequency_penalties(
        penalized, [s.output_ids for s in seqs], [p.presence_penalty for p in params],
        [p.frequency_penalty for p in params])
    tokens = penalized.argmax(dim=-1)  # [rows]
    for row, (seq, p) in enumerate(zip(seqs, params, strict=True)):
        if p.greedy or row in dead_ends:
            continue
        scaled = filter_top_k_top_p(penalized[row] / p.temperature, p.top_k, p.top_p)  # [vocab]
        tokens[row] = draw(scaled.softmax(-1), seq.generator)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)  # [rows]

    asking = [row for row, p in enumerate(params) if p.top_logprobs > 0]
    top_logprobs: list[tuple[tuple[int, float], ...]] = [()] * len(seqs)
    if asking:
        k = min(max(params[row].top_logprobs for row in asking), logits.shape[1])
        asked = logprobs if len(asking) == len(seqs) else logprobs[torch.tensor(asking, device=logits.device)]
        top_values, top_ids = asked.topk(k, dim=-1)  # [len(asking), k] each, most likely first
        for row, ids, values in zip(asking, top_ids.tolist(), top_values.tolist(), strict=True):
            n = params[row].top_logprobs
            top_logprobs[row] = tuple(zip(ids[:n], values[:n], strict=True))
    return Sampled(tokens.tolist(), chosen.tolist(), top_logprobs, dead_ends)
