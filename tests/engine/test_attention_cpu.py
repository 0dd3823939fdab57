"""The attention step's CPU kernels (server/engine/attention_cpu.py) against the portable path."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine import attention_cpu, cpu_extension
from loraplex.server.engine.attention import AttentionBatch, batch_invariant_attention
from loraplex.server.engine.model import rotate

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


def check_against_the_portable_path(decode_attention, heads: int, kv_heads: int, window: int | None, dtype,
                                    head_dim: int = HEAD_DIM) -> None:
    """`decode_attention` (a build of the kernel) on contexts of 1..64 rows (partial blocks of rows included)
    within float32 (bfloat16) rounding of the portable path computed in float64."""
    generator = torch.Generator().manual_seed(heads + kv_heads)
    lengths = [1, 7, 33, 2, 64, 18]
    keys = torch.randn(ROWS, kv_heads, head_dim, generator=generator).to(dtype)  # [rows, kv_heads, D]
    values = torch.randn(ROWS, kv_heads, head_dim, generator=generator).to(dtype)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)  # one decode token each
    batch = decode_batch(lengths, {window}, seed=1)
    group = batch.groups[0]
    out = torch.full_like(q, float("nan"))
    decode_attention(out, q, keys, values, group.query_index, group.context_rows, group.lengths, window or 0)
    expected = portable(q.double(), keys.double(), values.double(), batch, window)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (out.double() - expected).abs().max().item() < tolerance


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 2)], ids=["gqa3", "mha", "gqa4"])
@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_the_portable_path(heads: int, kv_heads: int, window: int | None, dtype) -> None:
    check_against_the_portable_path(attention_cpu.decode_attention, heads, kv_heads, window, dtype)


@pytest.mark.parametrize("head_dim", [16, 32, 128])
def test_other_head_dims(head_dim: int) -> None:
    """Head sizes of the tiny families (16, 32) and of 8B-class models (128): fewer or more vectors per row."""
    check_against_the_portable_path(attention_cpu.decode_attention, 8, 2, None, torch.float32, head_dim)


def test_a_head_dim_the_kernel_does_not_take_goes_the_portable_way() -> None:
    q = torch.zeros(1, 4, 24)  # [tokens, heads, 24]: not a multiple of 16
    assert not attention_cpu.supports(q, 4, 2)
    assert attention_cpu.supports(torch.zeros(1, 4, 32), 4, 2)


@pytest.mark.parametrize("flags", [("-mno-avx2", "-mno-fma", "-mno-avx512f"), ("-mno-avx512f",)],
                         ids=["plain_cpp", "avx2_only"])
def test_the_other_cpu_paths_match_the_portable_path(flags: tuple[str, ...]) -> None:
    """The kernel built as for a CPU without AVX2/FMA/AVX-512, or with AVX2 but no AVX-512 (`-march=native` minus
    those: on the CPUs that have them each path runs here too), within the same bound."""
    if "-mno-avx2" not in flags and "avx2" not in cpu_extension.cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    name = "decode_attention_" + "_".join(f.strip("-").replace("-", "_") for f in flags)
    build = cpu_extension.build(name, attention_cpu._SOURCE, (*attention_cpu.CFLAGS, *flags))
    assert build is not None
    for dtype in (torch.float32, torch.bfloat16):
        check_against_the_portable_path(build.decode_attention, 9, 3, None, dtype)
        check_against_the_portable_path(build.decode_attention, 8, 2, 5, dtype)


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


@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "head_dim"),
                         [(1, 9, 3, 64), (32, 9, 3, 64), (67, 4, 2, 16), (130, 8, 8, 128)])
def test_rotate_and_store_gives_the_bits_of_rotate_and_index_copy(tokens, heads, kv_heads, head_dim) -> None:
    """q rotated, k rotated and v written at scattered cache rows (other rows untouched), as model.rotate and
    index_copy_ compute them, bit for bit."""
    generator = torch.Generator().manual_seed(tokens)
    q = torch.randn(tokens, heads * head_dim, generator=generator)
    k, v = (torch.randn(tokens, kv_heads * head_dim, generator=generator) for _ in range(2))
    angles = torch.rand(tokens, head_dim, generator=generator) * 6
    half = head_dim // 2
    cos, signed_sin = angles.cos(), torch.cat((-angles.sin()[:, :half], angles.sin()[:, half:]), dim=-1)
    write_rows = torch.randperm(ROWS, generator=generator)[:tokens]
    keys, values = (torch.randn(ROWS, kv_heads, head_dim, generator=generator) for _ in range(2))
    expected_keys, expected_values = keys.clone(), values.clone()
    expected_keys.index_copy_(0, write_rows, rotate(k.view(tokens, kv_heads, head_dim), cos, signed_sin))
    expected_values.index_copy_(0, write_rows, v.view(tokens, kv_heads, head_dim))
    rotated = attention_cpu.rotate_and_store(q, k, v, cos, signed_sin, keys, values, write_rows)
    assert torch.equal(rotated, rotate(q.view(tokens, heads, head_dim), cos, signed_sin))
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


def test_rotate_and_store_refuses_a_row_outside_the_cache() -> None:
    q, k = torch.zeros(1, 64), torch.zeros(1, 64)
    cos = torch.ones(1, 64)
    keys, values = torch.zeros(4, 1, 64), torch.zeros(4, 1, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        attention_cpu.rotate_and_store(q, k, k, cos, cos, keys, values, torch.tensor([4]))
    assert not keys.any() and not values.any()
