"""CPU fast path of the multi-LoRA op: a compiled kernel for decode-sized groups, batched matmuls for the rest.

Semantics are exactly `lora.lora_reference`'s. On a CPU the decode step's LoRA cost is reading each
present adapter's weights; gathering them into a stacked copy (as `lora_grouped` does) reads them
three times. This path reads them in place, from the slot buffers, once:

- tokens of groups smaller than `LARGE_GROUP` (typically decode tokens of distinct adapters) go
  through one compiled kernel call per projection that walks tiles of up to 4 same-slot tokens in
  parallel and, for token i, computes h = A[s_i, :r_i] @ x[i] * scale[s_i], then y[i] += h @ B[s_i, :r_i]
  (each weight row read once per tile, kept in registers/L1 for the tile's tokens);
- groups of at least `LARGE_GROUP` tokens (prefill chunks) go through `grouped_matmul`: batched
  BLAS matmuls, where the one gathered copy of each adapter is small next to the token work.

The kernel is compiled on first use for the host CPU (`cpu_extension`); when no compiler is
available `available()` is False and the engine uses `lora_grouped` instead.
"""

from __future__ import annotations

import functools

import torch

from loraplex.server.engine import cpu_extension
from loraplex.server.engine.lora import LoraBatch, LoraSlots, grouped_matmul

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

// 8 floats in one register (AVX on x86-64, two NEON registers on arm64); unaligned loads.
typedef float v8 __attribute__((vector_size(32), aligned(4)));
static inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }
static inline void store8(float* p, v8 v) { *reinterpret_cast<v8*>(p) = v; }
static inline float sum8(v8 v) { return v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7]; }
constexpr int kTile = 4;  // tokens of one slot computed together: each weight load feeds kTile FMAs

// One tile: T tokens sharing slot s. h[t][j] = scale * A[s, j] . x[t]; y[t] += h[t] @ B[s, :r].
template <int T>
static void tile(float* y, const float* x, const float* a, const float* b, float scale, int64_t r,
                 int64_t in, int64_t out, const int64_t* tokens, float* h) {
  const float* xs[T];
  float* ys[T];
  for (int t = 0; t < T; ++t) { xs[t] = x + tokens[t] * in; ys[t] = y + tokens[t] * out; }
  const int64_t in8 = in - in % 8, out8 = out - out % 8;
  for (int64_t j = 0; j < r; ++j) {  // shrink: a row of A is read once for T tokens
    const float* arow = a + j * in;
    v8 acc[T] = {};
    for (int64_t i = 0; i < in8; i += 8) {
      const v8 av = load8(arow + i);
      for (int t = 0; t < T; ++t) acc[t] += av * load8(xs[t] + i);
    }
    for (int t = 0; t < T; ++t) {
      float dot = sum8(acc[t]);
      for (int64_t i = in8; i < in; ++i) dot += arow[i] * xs[t][i];
      h[t * r + j] = dot * scale;
    }
  }
  for (int64_t o = 0; o < out8; o += 8) {  // expand: 8 outputs of T tokens stay in registers over r rows of B
    v8 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = load8(ys[t] + o);
    for (int64_t k = 0; k < r; ++k) {
      const v8 bv = load8(b + k * out + o);
      for (int t = 0; t < T; ++t) acc[t] += h[t * r + k] * bv;
    }
    for (int t = 0; t < T; ++t) store8(ys[t] + o, acc[t]);
  }
  for (int64_t o = out8; o < out; ++o)
    for (int t = 0; t < T; ++t)
      for (int64_t k = 0; k < r; ++k) ys[t][o] += h[t * r + k] * b[k * out + o];
}

// y[t] += (A[s, :r] @ x[t] * scale[s]) @ B[s, :r] for t = tokens[k], s = slots[k], r = ranks[s].
// A: [slots, R, in], B: [slots, R, out] (transposed LoRA B); rows past r are never read.
// Tokens of one slot must be adjacent in `tokens` (LoraBatch orders them so).
void lora_bgmv(torch::Tensor y, torch::Tensor x, torch::Tensor A, torch::Tensor B, torch::Tensor scale,
               torch::Tensor ranks, torch::Tensor tokens, torch::Tensor slots) {
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && A.is_contiguous() && B.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat, "float32 inputs");
  const int64_t n = tokens.size(0), in = x.size(1), out = y.size(1), max_rank = A.size(1);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* ap = A.data_ptr<float>();
  const float* bp = B.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const int64_t* rp = ranks.data_ptr<int64_t>();
  const int64_t* tp = tokens.data_ptr<int64_t>();
  const int64_t* slp = slots.data_ptr<int64_t>();
  std::vector<int64_t> starts;  // tiles: up to kTile adjacent tokens of the same slot
  for (int64_t k = 0; k < n;) {
    starts.push_back(k);
    const int64_t limit = std::min(n, k + kTile);
    const int64_t slot = slp[k];
    while (++k < limit && slp[k] == slot) {}
  }
  starts.push_back(n);
  at::parallel_for(0, static_cast<int64_t>(starts.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(kTile * max_rank);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = starts[i], count = starts[i + 1] - first, s = slp[first], r = rp[s];
      const float* a = ap + s * max_rank * in;
      const float* b = bp + s * max_rank * out;
      switch (count) {
        case 1: tile<1>(yp, xp, a, b, sp[s], r, in, out, tp + first, h.data()); break;
        case 2: tile<2>(yp, xp, a, b, sp[s], r, in, out, tp + first, h.data()); break;
        case 3: tile<3>(yp, xp, a, b, sp[s], r, in, out, tp + first, h.data()); break;
        default: tile<4>(yp, xp, a, b, sp[s], r, in, out, tp + first, h.data()); break;
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("lora_bgmv", &lora_bgmv); }
"""


@functools.cache
def _extension():
    """The compiled kernel module, or None when it cannot be built here."""
    return cpu_extension.build("lora_bgmv", _SOURCE)


def available() -> bool:
    return _extension() is not None


def lora_cpu(y: torch.Tensor, x: torch.Tensor, slots: LoraSlots, batch: LoraBatch) -> torch.Tensor:
    """Same result as `lora_reference` for float32 tensors on the CPU; returns y (updated in place)."""
    grouped_matmul(y, x, slots, batch.large_groups)
    if batch.small_tokens.numel():
        _extension().lora_bgmv(y, x.contiguous(), slots.A, slots.B, slots.scale, batch.slot_ranks,
                               batch.small_tokens, batch.small_slots)
    return y
