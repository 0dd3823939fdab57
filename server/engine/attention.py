"""Attention over the paged KV cache for a batch that mixes prefill chunks and decode tokens.

The batch's tokens are flat (`[num_tokens, ...]`), sequence after sequence. Sequences with one new
token (decode) are attended together: on the CPU by `attention_cpu`'s kernel and on CUDA by
`attention_triton`'s, both reading the cache in place, elsewhere in one padded call over gathered
rows; each sequence with several new tokens (a prefill chunk) gets its own call over its whole
context. All index tensors are built once per step (`AttentionBatch.build`) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.server.engine import attention_cpu


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences attended in one call: queries [G, Q], context rows [G, K] into the flat KV storage."""

    query_index: torch.Tensor
    """[G * Q] positions of the group's queries in the flat batch."""
    context_rows: torch.Tensor
    """[G, K] KV storage rows of each sequence's context (padding repeats a valid row)."""
    masks: dict[int | None, torch.Tensor]
    """Sliding window (None: full causal) -> bool [G, 1, Q, K], True where a query may attend."""
    lengths: torch.Tensor
    """[G] context length of each sequence, this step's tokens included."""
    num_queries: int


@dataclass(frozen=True)
class AttentionBatch:
    """Where this step's new keys/values go, and how each sequence's queries see its context."""

    write_rows: torch.Tensor
    """[num_tokens] KV storage row of each new token."""
    groups: tuple[AttentionGroup, ...]
    decode_kernel: str = "torch"
    """Who attends the decode group (kernel_choice.decode_attention): "triton" (attention_triton, CUDA) or
    "torch" (the CPU kernel where `attention_cpu.supports` it, else the gathered calls below)."""

    @staticmethod
    def build(sequences: list[tuple[int, int, list[int]]], windows: set[int | None],
              device: torch.device, decode_kernel: str = "torch") -> AttentionBatch:
        """`sequences`: per sequence (context length before this step, new tokens, storage rows of the
        full context including the new tokens), in batch order. `windows`: the sliding windows in use."""
        write_rows: list[int] = []
        decode: list[tuple[int, int, list[int]]] = []  # (first query, start position, rows)
        prefill: list[tuple[int, int, list[int]]] = []
        offset = 0
        for start, count, rows in sequences:
            write_rows.extend(rows[start:start + count])
            (decode if count == 1 else prefill).append((offset, start, rows))
            offset += count
        groups = []
        if decode:
            groups.append(_group([d[0] for d in decode], 1, [d[1] for d in decode], [d[2] for d in decode],
                                 windows, device))
        for first, start, rows in prefill:
            groups.append(_group([first], len(rows) - start, [start], [rows], windows, device))
        return AttentionBatch(torch.tensor(write_rows, dtype=torch.long, device=device), tuple(groups), decode_kernel)


def _group(first_queries: list[int], num_queries: int, starts: list[int], rows: list[list[int]],
           windows: set[int | None], device: torch.device) -> AttentionGroup:
    context = max(len(r) for r in rows)
    query_index = torch.tensor([f + q for f in first_queries for q in range(num_queries)], device=device)
    context_rows = torch.tensor([r + [r[0]] * (context - len(r)) for r in rows], device=device)  # [G, K]
    query_pos = torch.tensor(starts, device=device)[:, None] + torch.arange(num_queries, device=device)  # [G, Q]
    key_pos = torch.arange(context, device=device)  # [K]
    lengths = torch.tensor([len(r) for r in rows], device=device)  # [G]
    visible = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < lengths[:, None, None])
    masks = {}
    for window in windows:
        mask = visible if window is None else visible & (query_pos[:, :, None] - key_pos[None, None, :] < window)
        masks[window] = mask.unsqueeze(1)  # [G, 1, Q, K]
    return AttentionGroup(query_index, context_rows, masks, lengths, num_queries)


def batch_invariant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor
                              ) -> torch.Tensor:
    """softmax(q @ k.T / sqrt(D) masked) @ v, per sequence of the group, with results that do not
    depend on the other sequences: q [G, heads, Q, D], k/v [G, kv_heads, K, D], attn_mask bool
    [G, 1, Q, K] -> [G, heads, Q, D].

    `F.scaled_dot_product_attention` on the CPU gives two identical sequences of one padded batch
    different bits (its kernel splits the work by batch position), so a request's tokens would
    depend on which others share its step; batched matmuls and a softmax compute each sequence the
    same way wherever it sits. Query heads share their kv head in consecutive groups (GQA).
    """
    num_seqs, heads, num_queries, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(num_seqs, kv_heads, heads // kv_heads * num_queries, head_dim)
    scores = (grouped @ k.transpose(-1, -2)) * head_dim ** -0.5  # [G, kv_heads, heads/kv_heads * Q, K]
    scores = scores.view(num_seqs, heads, num_queries, -1).masked_fill(~attn_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).view(num_seqs, kv_heads, heads // kv_heads * num_queries, -1)
    return (weights @ v).view(num_seqs, heads, num_queries, head_dim)


def paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: AttentionBatch,
                    window: int | None) -> torch.Tensor:
    """q: [num_tokens, heads, head_dim]; keys/values: one layer's storage [rows, kv_heads, head_dim],
    already holding this step's tokens. Returns [num_tokens, heads, head_dim].

    The decode group goes to the Triton kernel on CUDA (`attention_triton`) or the CPU kernel where it
    runs (`attention_cpu`), both reading the cache in place; prefill chunks, and decode elsewhere, gather
    their context and use the calls below."""
    q = q.contiguous()
    out = torch.empty_like(q)
    for group in batch.groups:
        if group.num_queries == 1 and batch.decode_kernel == "triton":
            from loraplex.server.engine import attention_triton  # imports Triton: CUDA engines only

            attention_triton.decode_attention(out, q, keys, values, group.query_index, group.context_rows,
                                              group.lengths, window)
            continue
        if group.num_queries == 1 and attention_cpu.supports(q, q.shape[1], keys.shape[1]):
            attention_cpu.decode_attention(out, q, keys, values, group.query_index, group.context_rows,
                                           group.lengths, window)
            continue
        num_seqs, context = group.context_rows.shape
        q_g = q.index_select(0, group.query_index).view(num_seqs, group.num_queries, *q.shape[1:])
        rows = group.context_rows.view(-1)
        k_g = keys.index_select(0, rows).view(num_seqs, context, *keys.shape[1:])  # [G, K, kv_heads, D]
        v_g = values.index_select(0, rows).view(num_seqs, context, *values.shape[1:])
        q_g, k_g, v_g, mask = q_g.transpose(1, 2), k_g.transpose(1, 2), v_g.transpose(1, 2), group.masks[window]
        if num_seqs == 1:  # a prefill chunk alone: nothing else in the call to depend on
            attended = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=mask, enable_gqa=True)
        else:
            attended = batch_invariant_attention(q_g, k_g, v_g, mask)  # [G, heads, Q, D]
        out.index_copy_(0, group.query_index, attended.transpose(1, 2).reshape(-1, *q.shape[1:]))
    return out
