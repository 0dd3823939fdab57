"""The attention step's CPU kernels: rotary embedding fused with the cache write, and decode attention
reading the paged KV cache in place.

`rotate_and_store` does what the model's portable code does in fourteen torch calls per layer
(`model.rotate` of q and of k, then two `index_copy_` into the cache), in one, with the same bits:
float32, each product and sum rounded as torch rounds them (built with -ffp-contract=off).

For the decode group of a step (one new token per sequence), `attention.paged_attention`'s portable
path gathers every sequence's context rows out of the cache (`index_select`), lays them out padded
as [G, kv_heads, K, D] (a copy), and runs batched matmuls and a softmax: on SmolLM2 with 32 sequences
the gathers and copies alone are about 15% of a decode step. This kernel computes, for each sequence
g and query head h (kv head h // (heads / kv_heads)),

    out[g, h] = sum_j softmax_j(q[g, h] . k[row_j] / sqrt(D)) * v[row_j]

over the visible context rows (the first `length_g`, the last `window` of them with a sliding
window), reading the rows where they are, float32 sums, one (sequence, kv head) per work item, each
computed alone in the same order: a sequence's result does not depend on the others in its step.
Scores come a register's width of rows at a time (16 with AVX-512, 8 with AVX2), their lanes summed
by one butterfly of shuffles; the weighted sum of values keeps up to half the registers of
accumulators over every row. bfloat16 inputs are widened to float32 as read and the result rounded
once. head_dim must be a multiple of 16 (every shape loraplex serves; others take the portable path).

Compiled on first use for the host CPU (`cpu_extension`); without a compiler `available()` is False
and attention keeps its portable path.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from loraplex.server.engine import cpu_extension

_SOURCE = cpu_extension.with_vectors(Path(__file__).with_suffix(".cpp").read_text())
"""The kernels' C++ source (attention_cpu.cpp beside this file, after cpu_vectors.h), compiled on first use."""
CFLAGS = ("-ffp-contract=off",)
"""No contraction: the rotary products and sums are rounded as torch's separate ops round them."""


@functools.cache
def _extension():
    """The compiled kernel module, or None when it cannot be built here."""
    return cpu_extension.build("decode_attention", _SOURCE, CFLAGS)


def supports(q: torch.Tensor, heads: int, kv_heads: int) -> bool:
    """Whether the kernel serves queries like `q` (device, dtype, GQA group of at most 16, head_dim a multiple
    of 16) here."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and heads // kv_heads <= 16
            and q.shape[-1] % 16 == 0 and _extension() is not None)


def decode_attention(out: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     query_index: torch.Tensor, context_rows: torch.Tensor, lengths: torch.Tensor,
                     window: int | None) -> None:
    """Writes out[query_index[g]] ([heads, head_dim]) for every decode sequence g.

    q/out: [num_tokens, heads, head_dim]; keys/values: one layer's storage [rows, kv_heads, head_dim];
    query_index [G]; context_rows [G, K] storage rows of each context (padding repeats a valid row);
    lengths [G] visible context length (1..K)."""
    _extension().decode_attention(out, q, keys, values, query_index, context_rows, lengths, window or 0)


def rotates_here(q: torch.Tensor) -> bool:
    """Whether `rotate_and_store` serves q here (CPU, float32, the kernel built)."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and _extension() is not None


def rotate_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, write_rows: torch.Tensor) -> torch.Tensor:
    """q rotated ([num_tokens, heads, head_dim]), with k rotated and v written into one layer's cache storage
    keys/values ([rows, kv_heads, head_dim]) at `write_rows` [num_tokens]: the bits of `model.rotate` (q, k) and
    `index_copy_`. q: [num_tokens, heads * head_dim], k/v: [num_tokens, kv_heads * head_dim]; cos/signed_sin
    [num_tokens, head_dim] as `model.rotate` takes them."""
    return _extension().rotate_and_store(q, k, v, cos, signed_sin, keys, values, write_rows)
