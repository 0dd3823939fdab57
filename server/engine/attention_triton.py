"""Decode attention on CUDA over the paged KV cache: a Triton kernel reading keys and values in place.

Semantics are `attention.batch_invariant_attention`'s for the decode group (one query per sequence):
for sequence g, whose query sits at flat position query_index[g] and whose context is the cache rows
context_rows[g, :lengths[g]] (its new token's included, the query at position lengths[g] - 1),

    out[query_index[g], h] = softmax(q[query_index[g], h] . keys[rows, h // group].T / sqrt(D)) @ values[rows, ...]

for every query head h, where `group = heads / kv_heads` query heads share a kv head (GQA). With a
sliding window w only the last w positions are visible (position p with lengths[g] - 1 - p < w).

One program per (sequence, kv head): its `group` query heads (padded to TRITON_ATTENTION_MAX_GROUP = 16
rows, a `tl.dot` tile) stream
the context in BLOCK_N-position tiles, loading each tile's rows through context_rows where they lie
in the cache (no gathered copy, no padded batch) with an online softmax in float32. A sequence is
computed by one program whatever shares its step, so its result does not depend on the batch.

Imported by `attention.paged_attention` only when the step's AttentionBatch says "triton"
(kernel_choice, CUDA engines with Triton installed); under `TRITON_INTERPRET=1` the kernel runs on
CPU tensors (tests/engine/test_triton_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.server.engine.kernel_choice import TRITON_ATTENTION_MAX_GROUP, triton_attention_fits

#: Context positions per loop iteration.
BLOCK_N = 64
#: `window` passed for full causal attention: every position of any context is visible.
NO_WINDOW = 2**30


@triton.jit
def _decode_attention(out_ptr, q_ptr, k_ptr, v_ptr, query_index_ptr, rows_ptr, lengths_ptr, scale, window,
                      stride_qt, stride_qh, stride_ot, stride_oh, stride_kr, stride_kh, stride_vr, stride_vh,
                      stride_rows, GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """out[token, heads of kv_head] for one decode sequence (see the module docstring)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    token = tl.load(query_index_ptr + seq).to(tl.int64)
    length = tl.load(lengths_ptr + seq)
    group_rows = tl.arange(0, GROUP_ROWS)
    in_group = group_rows < GROUP
    heads = kv_head * GROUP + group_rows  # [G]
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=in_group[:, None],
                other=0.0)  # [G, D]
    best = tl.full((GROUP_ROWS,), float("-inf"), dtype=tl.float32)  # running max of each head's scores
    total = tl.zeros((GROUP_ROWS,), dtype=tl.float32)  # running sum of exp(score - best)
    acc = tl.zeros((GROUP_ROWS, HEAD_DIM), dtype=tl.float32)
    position = tl.maximum(length - window, 0)  # the window's first visible position
    while position < length:
        positions = position + tl.arange(0, BLOCK_N)  # [N]
        visible = positions < length
        rows = tl.load(rows_ptr + seq * stride_rows + positions, mask=visible, other=0).to(tl.int64)
        k = tl.load(k_ptr + rows[:, None] * stride_kr + kv_head * stride_kh + dims[None, :], mask=visible[:, None],
                    other=0.0)  # [N, D]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G, N] float32
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_best[:, None])  # [G, N]
        rescale = tl.exp(best - new_best)
        total = total * rescale + tl.sum(weights, axis=1)
        v = tl.load(v_ptr + rows[:, None] * stride_vr + kv_head * stride_vh + dims[None, :], mask=visible[:, None],
                    other=0.0)  # [N, D]
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        best = new_best
        position += BLOCK_N
    out = acc / total[:, None]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=in_group[:, None])


def decode_attention(out: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     query_index: torch.Tensor, context_rows: torch.Tensor, lengths: torch.Tensor,
                     window: int | None) -> None:
    """Writes out[query_index[g]] for every decode sequence g (see the module docstring).

    out, q: [num_tokens, heads, D]; keys/values: [rows, kv_heads, D] (this step's tokens written);
    query_index: [G]; context_rows: [G, K] cache rows of each context (padded past lengths); lengths: [G]."""
    num_seqs = query_index.numel()
    if num_seqs == 0:
        return
    _, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    if not triton_attention_fits(heads, kv_heads, head_dim):
        raise ValueError(f"decode attention kernel: {heads} heads / {kv_heads} kv heads of dim {head_dim} unsupported")
    if q.stride(2) != 1 or out.stride(2) != 1 or keys.stride(2) != 1 or values.stride(2) != 1:
        raise ValueError("decode attention kernel: head dims must be contiguous")
    rows = context_rows.contiguous()
    _decode_attention[(num_seqs, kv_heads)](
        out, q, keys, values, query_index, rows, lengths, head_dim ** -0.5, NO_WINDOW if window is None else window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1), rows.stride(0),
        GROUP=heads // kv_heads, GROUP_ROWS=TRITON_ATTENTION_MAX_GROUP, HEAD_DIM=head_dim, BLOCK_N=BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
