"""The decoder's elementwise ops on their fast paths are bit-identical to the reference formulas that
transformers' Llama uses (so the parity suite's exact tokens do not depend on which path runs)."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine import norm_cpu
from loraplex.server.engine.model import add_rms_norm, rms_norm, rotate


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def reference_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


SHAPES = [(1, 576), (7, 576), (67, 576), (512, 576), (3, 64), (5, 9, 64), (40, 3, 16), (2, 1536), (4, 100), (3, 5120)]


@pytest.mark.parametrize("compiled", [True, False], ids=["norm_cpu", "F.rms_norm"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_rms_norm_fast_paths_are_bit_identical(shape, scale, compiled, monkeypatch):
    if compiled:  # the compiled kernel is built here and must serve every size tried (its own check passes)
        assert norm_cpu.serves(shape[-1])
    else:
        monkeypatch.setattr(norm_cpu, "serves", lambda features: False)
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=generator) * scale
    weight = torch.randn(shape[-1], generator=generator)
    assert torch.equal(rms_norm(x, weight, 1e-6), reference_rms_norm(x, weight, 1e-6))
    x16, w16 = x.bfloat16(), weight.bfloat16()  # bfloat16 keeps the reference formula itself
    assert torch.equal(rms_norm(x16, w16, 1e-6), reference_rms_norm(x16, w16, 1e-6))


@pytest.mark.parametrize("compiled", [True, False], ids=["norm_cpu", "torch"])
@pytest.mark.parametrize("rows", [1, 32, 300])
def test_residual_add_and_norm_are_the_two_ops_bits(rows, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(norm_cpu, "serves", lambda features: False)
    generator = torch.Generator().manual_seed(rows)
    hidden, delta = torch.randn(rows, 576, generator=generator), torch.randn(rows, 576, generator=generator)
    weight = torch.randn(576, generator=generator)
    total, normed = add_rms_norm(hidden, delta, weight, 1e-5)
    assert torch.equal(total, hidden + delta)
    assert torch.equal(normed, reference_rms_norm(hidden + delta, weight, 1e-5))


def test_the_kernel_leaves_small_rows_and_other_sums_to_torch(monkeypatch):
    assert not norm_cpu.serves(norm_cpu.MIN_FEATURES - 1)  # fewer elements than a vector: torch sums otherwise
    norm_cpu.serves.cache_clear()
    monkeypatch.setattr(norm_cpu, "reference_rms_norm", lambda x, weight, eps: x)  # a torch whose bits differ
    try:
        assert not norm_cpu.serves(576)
    finally:
        norm_cpu.serves.cache_clear()


@pytest.mark.parametrize(("tokens", "heads", "head_dim"), [(1, 9, 64), (32, 3, 64), (67, 2, 16), (5, 4, 128)])
def test_rotate_with_the_sign_folded_into_sin_is_bit_identical(tokens, heads, head_dim):
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, heads, head_dim, generator=generator)
    cos, sin = torch.randn(tokens, head_dim, generator=generator), torch.randn(tokens, head_dim, generator=generator)
    half = head_dim // 2
    signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    assert torch.equal(rotate(x, cos, signed_sin), reference_rotate(x, cos, sin))
