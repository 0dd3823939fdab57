"""CUDA path of the multi-LoRA op: Triton kernels that read the slot buffers in place.

Semantics are exactly `lora.lora_reference`'s:

    y[i] += (x[i] @ A[s_i].T) @ B[s_i] * scale[s_i]      for every token i with slot s_i >= 0

with A: [num_slots, max_rank, in], B: [num_slots, max_rank, out] (B transposed, see lora.py) and
tokens of slot -1 left untouched. Each slot's rows past its rank (`LoraBatch.slot_ranks`) are masked
off, never read, so adapters of mixed ranks cost what their own rank costs; a projection an adapter
does not target holds zeros in its slot and adds exactly zero. No adapter weight is gathered or
copied: every program reads its slot's rows of A and B where they lie.

Two kernel pairs, each a shrink (h = x @ A[s, :r].T * scale[s], float32, into a scratch [tokens, R])
followed by an expand (y += h @ B[s, :r]):

- SGMV for prefill-sized groups (`LoraBatch.large_groups`: >= LARGE_GROUP tokens of one slot). A
  segment is one group's tokens (`GroupLayout.token_index[starts[g]:starts[g + 1]]`); a program takes
  BLOCK_M of its tokens and multiplies them by the slot's A (then B) with `tl.dot`, so each adapter
  row is loaded once per BLOCK_M tokens.
- BGMV for the other tokens (`LoraBatch.small_tokens` / `small_slots`: decode tokens, typically of
  distinct adapters): one program per token (per output tile for the expand), multiply-and-reduce
  without `tl.dot`, which needs no padding of a single token to a 16-row tile. A token given with
  slot -1 reads nothing and adds zero: a CUDA-graph decode step (cuda_graphs.py) passes all its
  tokens, whatever their slots, so that its launch shapes stay fixed.

Tokens appear once across both sets, so every y row is written by one program per output tile:
no atomics, and a token's result does not depend on which other tokens share its step.

This module imports Triton at import time; the engine imports it only on CUDA where Triton is
installed (`kernel_choice`), so the CPU engine never needs Triton. Under `TRITON_INTERPRET=1`
(set before this module is imported) the same kernels run on CPU tensors, which is how
tests/engine/test_triton_kernels.py proves them on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.server.engine.lora import GroupLayout, LoraBatch, LoraSlots

#: Tokens of one SGMV program (a `tl.dot` tile needs at least 16 rows).
SGMV_BLOCK_M = 16
#: Input features reduced per loop iteration by the shrink kernels.
SHRINK_BLOCK_K = 128
#: Output features written by one expand program.
EXPAND_BLOCK_N = 128
#: Smallest padded rank: `tl.dot` needs inner and outer sizes of at least 16.
MIN_BLOCK_R = 16


@triton.jit
def _sgmv_shrink(x_ptr, a_ptr, scale_ptr, ranks_ptr, tokens_ptr, starts_ptr, group_slots_ptr, h_ptr,
                 stride_x, stride_a_slot, stride_a_rank, stride_h, IN_FEATURES: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """h[p, :r] = x[tokens[p]] @ A[slot, :r].T * scale[slot] for BLOCK_M positions p of one group."""
    group = tl.program_id(0)
    start = tl.load(starts_ptr + group)
    end = tl.load(starts_ptr + group + 1)
    slot = tl.load(group_slots_ptr + group)
    rank = tl.load(ranks_ptr + slot)
    positions = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] into tokens / h
    in_group = positions < end
    tokens = tl.load(tokens_ptr + positions, mask=in_group, other=0).to(tl.int64)  # [M]
    ranks = tl.arange(0, BLOCK_R)
    in_rank = ranks < rank
    a_rows = a_ptr + slot.to(tl.int64) * stride_a_slot + ranks[:, None] * stride_a_rank  # [R, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, IN_FEATURES, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_k = ks < IN_FEATURES
        x = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :], mask=in_group[:, None] & in_k[None, :],
                    other=0.0)  # [M, K]
        a = tl.load(a_rows + ks[None, :], mask=in_rank[:, None] & in_k[None, :], other=0.0)  # [R, K]
        acc += tl.dot(x, tl.trans(a), input_precision=PRECISION)  # [M, R]
    acc *= tl.load(scale_ptr + slot).to(tl.float32)
    tl.store(h_ptr + positions[:, None] * stride_h + ranks[None, :], acc, mask=in_group[:, None])


@triton.jit
def _sgmv_expand(y_ptr, b_ptr, ranks_ptr, tokens_ptr, starts_ptr, group_slots_ptr, h_ptr,
                 out_features, stride_y, stride_b_slot, stride_b_rank, stride_h,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """y[tokens[p], n] += h[p, :r] @ B[slot, :r, n] for BLOCK_M positions p of one group, BLOCK_N outputs n."""
    group = tl.program_id(0)
    start = tl.load(starts_ptr + group)
    end = tl.load(starts_ptr + group + 1)
    slot = tl.load(group_slots_ptr + group)
    rank = tl.load(ranks_ptr + slot)
    positions = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [M]
    in_group = positions < end
    tokens = tl.load(tokens_ptr + positions, mask=in_group, other=0).to(tl.int64)  # [M]
    ranks = tl.arange(0, BLOCK_R)
    in_rank = ranks < rank
    outs = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_out = outs < out_features
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_b_slot + ranks[:, None] * stride_b_rank + outs[None, :],
                mask=in_rank[:, None] & in_out[None, :], other=0.0)  # [R, N]
    h = tl.load(h_ptr + positions[:, None] * stride_h + ranks[None, :], mask=in_group[:, None] & in_rank[None, :],
                other=0.0)  # [M, R] float32
    delta = tl.dot(h.to(b.dtype), b, input_precision=PRECISION)  # [M, N] float32
    y_tile = y_ptr + tokens[:, None] * stride_y + outs[None, :]
    mask = in_group[:, None] & in_out[None, :]
    y = tl.load(y_tile, mask=mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


@triton.jit
def _position_slot(position, tokens_ptr, token_slots_ptr, ranks_ptr):
    """(token, slot, rank) of BGMV position `position`: a slot -1 token gets slot 0 and rank 0, so it reads
    nothing and adds zero."""
    token = tl.load(tokens_ptr + position).to(tl.int64)
    slot = tl.load(token_slots_ptr + position)
    has_slot = slot >= 0
    slot = tl.maximum(slot, 0)
    return token, slot, tl.where(has_slot, tl.load(ranks_ptr + slot), 0)


@triton.jit
def _bgmv_shrink(x_ptr, a_ptr, scale_ptr, ranks_ptr, tokens_ptr, token_slots_ptr, h_ptr,
                 stride_x, stride_a_slot, stride_a_rank, stride_h, IN_FEATURES: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[p, :r] = A[slot_p, :r] @ x[tokens[p]] * scale[slot_p] for one position p."""
    position = tl.program_id(0)
    token, slot, rank = _position_slot(position, tokens_ptr, token_slots_ptr, ranks_ptr)
    ranks = tl.arange(0, BLOCK_R)
    in_rank = ranks < rank
    a_rows = a_ptr + slot.to(tl.int64) * stride_a_slot + ranks[:, None] * stride_a_rank  # [R, 1]
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, IN_FEATURES, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_k = ks < IN_FEATURES
        x = tl.load(x_ptr + token * stride_x + ks, mask=in_k, other=0.0).to(tl.float32)  # [K]
        a = tl.load(a_rows + ks[None, :], mask=in_rank[:, None] & in_k[None, :], other=0.0)  # [R, K]
        acc += a.to(tl.float32) * x[None, :]
    h = tl.sum(acc, axis=1) * tl.load(scale_ptr + slot).to(tl.float32)  # [R]
    tl.store(h_ptr + position * stride_h + ranks, h)


@triton.jit
def _bgmv_expand(y_ptr, b_ptr, ranks_ptr, tokens_ptr, token_slots_ptr, h_ptr,
                 out_features, stride_y, stride_b_slot, stride_b_rank, stride_h,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[tokens[p], n] += h[p, :r] @ B[slot_p, :r, n] for one position p and BLOCK_N outputs n."""
    position = tl.program_id(0)
    token, slot, rank = _position_slot(position, tokens_ptr, token_slots_ptr, ranks_ptr)
    ranks = tl.arange(0, BLOCK_R)
    in_rank = ranks < rank
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_out = outs < out_features
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_b_slot + ranks[:, None] * stride_b_rank + outs[None, :],
                mask=in_rank[:, None] & in_out[None, :], other=0.0)  # [R, N]
    h = tl.load(h_ptr + position * stride_h + ranks, mask=in_rank, other=0.0)  # [R] float32
    # h rounded to B's dtype first, as the reference's hidden is (and as the SGMV expand's tl.dot takes it)
    delta = tl.sum(h.to(b.dtype).to(tl.float32)[:, None] * b.to(tl.float32), axis=0)  # [N]
    y = tl.load(y_ptr + token * stride_y + outs, mask=in_out, other=0.0)
    tl.store(y_ptr + token * stride_y + outs, (y.to(tl.float32) + delta).to(y.dtype), mask=in_out)


def _block_rank(rank: int) -> int:
    """The rank tile: the batch's largest rank, padded to a power of two of at least MIN_BLOCK_R."""
    return max(MIN_BLOCK_R, triton.next_power_of_2(rank))


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs are multiplied in full precision (Triton's default would round them to tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def sgmv(y: torch.Tensor, x: torch.Tensor, slots: LoraSlots, layout: GroupLayout, slot_ranks: torch.Tensor
         ) -> torch.Tensor:
    """The LoRA op for the tokens of `layout` (segments of same-slot tokens); returns y, updated in place.

    x: [num_tokens, in], y: [num_tokens, out]; slot_ranks: [num_slots] rank of each slot."""
    if layout.empty:
        return y
    num_groups, tokens = layout.slots.numel(), layout.token_index.numel()
    block_r = _block_rank(layout.rank)
    h = torch.empty(tokens, block_r, dtype=torch.float32, device=x.device)  # [grouped tokens, R]
    m_blocks = triton.cdiv(layout.group_len, SGMV_BLOCK_M)
    precision = _dot_precision(x.dtype)
    _sgmv_shrink[(num_groups, m_blocks)](
        x, slots.A, slots.scale, slot_ranks, layout.token_index, layout.starts, layout.slots, h,
        x.stride(0), slots.A.stride(0), slots.A.stride(1), h.stride(0), IN_FEATURES=x.shape[1],
        BLOCK_M=SGMV_BLOCK_M, BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K, PRECISION=precision,
    )
    out_features = y.shape[1]
    _sgmv_expand[(num_groups, m_blocks, triton.cdiv(out_features, EXPAND_BLOCK_N))](
        y, slots.B, slot_ranks, layout.token_index, layout.starts, layout.slots, h,
        out_features, y.stride(0), slots.B.stride(0), slots.B.stride(1), h.stride(0),
        BLOCK_M=SGMV_BLOCK_M, BLOCK_R=block_r, BLOCK_N=EXPAND_BLOCK_N, PRECISION=precision,
    )
    return y


def bgmv(y: torch.Tensor, x: torch.Tensor, slots: LoraSlots, tokens: torch.Tensor, token_slots: torch.Tensor,
         slot_ranks: torch.Tensor, rank: int) -> torch.Tensor:
    """The LoRA op for `tokens` [n] of slots `token_slots` [n], one program per token; returns y (in place).

    `rank` bounds the ranks of those slots (it sizes the rank tile)."""
    count = tokens.numel()
    if count == 0:
        return y
    block_r = _block_rank(rank)
    h = torch.empty(count, block_r, dtype=torch.float32, device=x.device)  # [n, R]
    _bgmv_shrink[(count,)](
        x, slots.A, slots.scale, slot_ranks, tokens, token_slots, h,
        x.stride(0), slots.A.stride(0), slots.A.stride(1), h.stride(0), IN_FEATURES=x.shape[1],
        BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K,
    )
    out_features = y.shape[1]
    _bgmv_expand[(count, triton.cdiv(out_features, EXPAND_BLOCK_N))](
        y, slots.B, slot_ranks, tokens, token_slots, h,
        out_features, y.stride(0), slots.B.stride(0), slots.B.stride(1), h.stride(0),
        BLOCK_R=block_r, BLOCK_N=EXPAND_BLOCK_N,
    )
    return y


def lora_triton(y: torch.Tensor, x: torch.Tensor, slots: LoraSlots, batch: LoraBatch) -> torch.Tensor:
    """Same result as `lora_reference` (up to summation order); returns y (updated in place).

    Prefill-sized groups go through SGMV, every other adapter token through BGMV."""
    x = x.contiguous()
    sgmv(y, x, slots, batch.large_groups, batch.slot_ranks)
    return bgmv(y, x, slots, batch.small_tokens, batch.small_slots, batch.slot_ranks, batch.groups.rank)
