"""The CPU decode attention kernel (server/engine/attention_cpu.py) against the portable path."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine import attention_cpu
from loraplex.server.engine.attention import AttentionBatch, batch_invariant_attention

pytestmark = pytest.mark.skipif(attention_cpu._extension() is None, reason="no C++ compiler here")

HEAD_DIM, ROWS = 64, 512


def decode_batch(lengths: list[int], windows: set[int | None], seed: int) -> AttentionBatch:
    """One decode token per sequence, contexts of `lengths` at scattered storage rows."""
    permutation = torch.randperm(ROWS, generator=torch.Generator().manual_seed(seed)).tolist()
    sequences, used = [], 0
    for length in lengths:
        sequences.append((length - 1, 1, permutation[used:used + length]))
        used += length
    return AttentionBatch.build(sequences, windows, torch.device("cpu"))


def portable(q, keys, values, batch: AttentionBatch, window: int | None) -> torch.Tensor:
    """The gathered, padded path the kernel replaces on the CPU: [G, heads, D]."""
    group = batch.groups[0]
    num_seqs, context = group.context_rows.shape
    k = keys.index_select(0, group.context_rows.view(-1)).view(num_seqs, context, *keys.shape[1:]).transpose(1, 2)
    v = values.index_select(0, group.context_rows.view(-1)).view(num_seqs, context, *keys.shape[1:]).transpose(1, 2)
    return batch_invariant_attention(q[:, None].transpose(1, 2), k, v, group.masks[window])[:, :, 0]


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 2)], ids=["gqa3", "mha", "gqa4"])
@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_the_portable_path(heads: int, kv_heads: int, window: int | None, dtype) -> None:
    generator = torch.Generator().manual_seed(heads + kv_heads)
    lengths = [1, 7, 33, 2, 64, 18]
    keys = torch.randn(ROWS, kv_heads, HEAD_DIM, generator=generator).to(dtype)  # [rows, kv_heads, D]
    values = torch.randn(ROWS, kv_heads, HEAD_DIM, generator=generator).to(dtype)
    q = torch.randn(len(lengths), heads, HEAD_DIM, generator=generator).to(dtype)  # one decode token each
    batch = decode_batch(lengths, {window}, seed=1)
    group = batch.groups[0]
    out = torch.full_like(q, float("nan"))
    attention_cpu.decode_attention(out, q, keys, values, group.query_index, group.context_rows, group.lengths,
                                   window)
    expected = portable(q.double(), keys.double(), values.double(), batch, window)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (out.double() - expected).abs().max().item() < tolerance


def test_a_sequence_gets_the_same_bits_alone_and_in_a_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(ROWS, 3, HEAD_DIM, generator=generator)
    values = torch.randn(ROWS, 3, HEAD_DIM, generator=generator)
    lengths = [40, 3, 17, 64]
    q = torch.randn(len(lengths), 9, HEAD_DIM, generator=generator)
    batch = decode_batch(lengths, {None}, seed=2)
    group = batch.groups[0]
    together = torch.empty_like(q)
    attention_cpu.decode_attention(together, q, keys, values, group.query_index, group.context_rows, group.lengths,
                                   None)
    for g in range(len(lengths)):
        rows = group.context_rows[g:g + 1, :lengths[g]].contiguous()
        alone = torch.empty_like(q[g:g + 1])
        attention_cpu.decode_attention(alone, q[g:g + 1].contiguous(), keys, values, torch.zeros(1, dtype=torch.long),
                                       rows, group.lengths[g:g + 1], None)
        assert torch.equal(alone[0], together[g])


def test_peaked_and_flat_scores() -> None:
    """Scores spread over hundreds (most weights underflow to 0) and all equal (uniform weights)."""
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(ROWS, 3, HEAD_DIM, generator=generator)
    values = torch.randn(ROWS, 3, HEAD_DIM, generator=generator)
    lengths = [64, 50, 31]
    batch = decode_batch(lengths, {None}, seed=3)
    group = batch.groups[0]
    for q in (40 * torch.randn(len(lengths), 9, HEAD_DIM, generator=generator), torch.zeros(len(lengths), 9, HEAD_DIM)):
        out = torch.empty_like(q)
        attention_cpu.decode_attention(out, q, keys, values, group.query_index, group.context_rows, group.lengths,
                                       None)
        expected = portable(q.double(), keys.double(), values.double(), batch, None)
        assert (out.double() - expected).abs().max().item() < 1e-5
