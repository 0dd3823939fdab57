"""RMSNorm for float32 rows on the CPU, with the same bits as the reference formula, in one call.

The model's norms are `weight * (x * rsqrt(mean(x^2) + eps))` (transformers' Llama). On the CPU torch's
`F.rms_norm` gives those bits but runs them as about ten aten calls (pow, sum, div, add, rsqrt, mul, casts):
16 us for a one-token row of SmolLM2 and 26 us for 32 rows, 61 calls a step, where the arithmetic takes
1-4 us (AVX2 EPYC). This kernel does the same arithmetic in one pass per row: the squares summed in the
order torch's sum of a contiguous last dimension adds them (SumKernel.cpp's cascade of 4 interleaved
vector columns; `norm_cpu.cpp` says how), divided by D, eps added, `1 / sqrt` (both correctly rounded,
as torch's rsqrt), then the two products in the formula's order: bit-identical to it, not merely close.
`add_rms_norm` also does the residual add before the norm (hidden + delta, and its norm) in the same call.

That order is torch's, for its vector width on this CPU; a torch that sums otherwise would make the bits
differ, so `serves(D)` checks the kernel against the formula on random rows once per row size, and where
they are not identical (or nothing compiled) the model keeps torch's `F.rms_norm`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from loraplex.server.engine import cpu_extension

log = logging.getLogger(__name__)

_SOURCE = cpu_extension.with_vectors(Path(__file__).with_suffix(".cpp").read_text())
"""The kernel's C++ source (norm_cpu.cpp beside this file, after cpu_vectors.h), compiled on first use."""
CFLAGS = ("-ffp-contract=off",)
"""No contraction: each square is rounded before it is summed, as torch's pow then sum round them."""
#: Row sizes below this reach torch's sum by another path (fewer elements than a vector): not served.
MIN_FEATURES = 16


@functools.cache
def _extension():
    """The compiled kernel module, or None when it cannot be built here."""
    return cpu_extension.build("rms_norm", _SOURCE, CFLAGS)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The formula the kernel's bits are those of (transformers' LlamaRMSNorm, in float32)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


@functools.cache
def serves(features: int) -> bool:
    """Whether `rms_norm` and `add_rms_norm` serve float32 rows of `features` here: built, and bit-identical to
    `reference_rms_norm` on random rows of that size (checked once per size, at 3 magnitudes and 5 rows)."""
    if features < MIN_FEATURES or _extension() is None:
        return False
    generator = torch.Generator().manual_seed(features)
    weight = torch.randn(features, generator=generator)
    for scale in (1e-3, 1.0, 1e3):
        x = torch.randn(5, features, generator=generator) * scale  # [rows, features]
        if not torch.equal(_extension().rms_norm(x, weight, 1e-6), reference_rms_norm(x, weight, 1e-6)):
            log.warning("compiled RMSNorm differs from torch's sums for %d features: using F.rms_norm", features)
            return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: contiguous float32 [rows, D], weight: float32 [D] -> [rows, D] with `reference_rms_norm`'s bits
    (where `serves(D)`)."""
    return _extension().rms_norm(x, weight, eps)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden, delta: contiguous float32 [rows, D] -> (hidden + delta, rms_norm(hidden + delta)), the bits of the
    two torch ops (where `serves(D)`)."""
    total, normed = _extension().add_rms_norm(hidden, delta, weight, eps)
    return total, normed
