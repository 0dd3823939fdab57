"""CPU fast path of the multi-LoRA op: one compiled kernel call per projection for every adapter token.

Semantics are exactly `lora.lora_reference`'s. On a CPU the decode step's LoRA cost is reading each
present adapter's weights; gathering them into a stacked copy (as `lora_grouped` does) reads them
three times. This path reads them in place, from the slot buffers, once.

Every token that names an adapter (decode tokens and prefill chunks alike) goes through one kernel call
that walks tiles of up to 8 same-slot tokens (4 with AVX2's 16 registers) in parallel and, for token i, computes
h = A[s_i, :r_i] @ x[i] * scale[s_i], then y[i] += h @ B[s_i, :r_i] (each weight row read once per tile,
kept in registers/L1 for the tile's tokens). Vectors are as wide as the CPU's (16 floats with AVX-512,
8 with AVX2), and each weight vector loaded feeds every token of the tile while several rows of A
(shrink) or vectors of outputs (expand) are summed at once, so the FMA pipes are never waiting on one
accumulator: 2.3x the previous one-row-at-a-time loop on 32 tokens of one adapter, 1.8x on 8 adapters
x 4 tokens, 1.2x on 32 distinct adapters (one thread, SmolLM2's projection shapes, r=16; Xeon with
AVX-512). The shrink's vector sums are reduced to scalars 16 (AVX-512) or 8 (AVX2) at a time by one
butterfly of shuffles, not lane by lane, and tiles hold 8 tokens where 32 registers allow: together 1.2x on
decode batches of one adapter or 8 x 4, 1.3x on 2048-token prefills (same shapes, both threads). Each
(token, row) sum runs over the input features in the same order, and its lanes are summed in the same tree,
whatever the tile, so a token's result does not depend on its batch.

Projections that read the same x (a layer's q, k and v; gate and up) go through one call (`lora_cpu_group`): one
pass of the threads over (tile, projection) items, each with the bits a call for that projection alone gives; on
SmolLM2 that is 4 calls a layer instead of 7, each paying the fixed cost of a call (a few microseconds on 2 cores).

Prefill-sized groups go through the same kernel rather than batched BLAS matmuls (`grouped_matmul`):
measured on SmolLM2's 576x576 projection with 2048 tokens of one adapter, 641 us against 3466 us, and
684 against 4017 us for 32 adapters x 64 tokens (the batched path also gathers x and scatter-adds y, and
r=16 is too thin for BLAS to reach its peak).

The tiles live in lora_tiles.h, which the fused NF4 kernel includes too: below its BLAS threshold the model runs
this op inside the NF4 call of the same projections (`nf4_cpu.Nf4Group.with_lora`, the same bits), the expand
on the thread that computed the base outputs it adds to.

The kernel is compiled on first use for the host CPU (`cpu_extension`); when no compiler is
available `available()` is False and the engine uses `lora_grouped` instead.
"""

from __future__ import annotations

import functools

import torch

from loraplex.server.engine import cpu_extension
from loraplex.server.engine.lora import LoraBatch, LoraSlots, SlotSet

_SOURCE = cpu_extension.with_vectors(r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
// One tile: T tokens sharing a slot. h[t][j] = scale * A[s, j] . x[t]; y[t] += h[t] @ B[s, :r]. While the shrink
// runs, `own_b` (this tile's B) is fetched; while the expand runs, `next_a` (the next tile's A).
template <int T>
static void tile(float* y, const float* x, const float* a, const float* b, float scale, int64_t r,
                 int64_t in, int64_t out, const int64_t* tokens, float* h, vf* partial, Prefetch own_b,
                 Prefetch next_a) {
  const float* xs[T];
  float* ys[T];
  for (int t = 0; t < T; ++t) { xs[t] = x + tokens[t] * in; ys[t] = y + tokens[t] * out; }
  shrink<T>(a, xs, in, r, scale, h, r, partial, own_b);
  expand_range<T>(b, h, r, ys, r, out, 0, out, next_a);
}

// One projection of a group that reads the same x: its output y [tokens, out] and slot buffers A [slots, R, in],
// B [slots, R, out] (transposed LoRA B), scale [slots].
struct Projection {
  float* y;
  const float* a;
  const float* b;
  const float* scale;
  int64_t out;
};

// For every projection p of the group: y_p[t] += (A_p[s, :r] @ x[t] * scale_p[s]) @ B_p[s, :r] for t = tokens[k],
// s = slots[k], r = ranks[s]; rows past r are never read. Tokens of one slot must be adjacent in `tokens`
// (LoraBatch orders them so). One pass of the threads over (tile, projection) items, tile-major so that each
// thread's share holds every projection's work for its tiles; each item computes what a call for that projection
// alone would, in the same order.
void lora_bgmv(std::vector<torch::Tensor> ys, torch::Tensor x, std::vector<torch::Tensor> As,
               std::vector<torch::Tensor> Bs, std::vector<torch::Tensor> scales, torch::Tensor ranks,
               torch::Tensor tokens, torch::Tensor slots) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "x: contiguous float32");
  TORCH_CHECK(ys.size() == As.size() && ys.size() == Bs.size() && ys.size() == scales.size(), "one A, B, scale per y");
  const int64_t n = tokens.size(0), in = x.size(1), max_rank = As.front().size(1);
  std::vector<Projection> group;
  for (size_t p = 0; p < ys.size(); ++p) {
    const torch::Tensor &y = ys[p], &A = As[p], &B = Bs[p];
    TORCH_CHECK(y.is_contiguous() && A.is_contiguous() && B.is_contiguous(), "contiguous inputs");
    TORCH_CHECK(y.scalar_type() == at::kFloat && A.size(2) == in && A.size(1) == max_rank, "float32 y, A of x's in");
    group.push_back({y.data_ptr<float>(), A.data_ptr<float>(), B.data_ptr<float>(), scales[p].data_ptr<float>(),
                     y.size(1)});
  }
  const float* xp = x.data_ptr<float>();
  const int64_t* rp = ranks.data_ptr<int64_t>();
  const int64_t* tp = tokens.data_ptr<int64_t>();
  const int64_t* slp = slots.data_ptr<int64_t>();
  const std::vector<int64_t> starts = slot_tiles(slp, n);
  const int64_t tiles = static_cast<int64_t>(starts.size()) - 1, projections = static_cast<int64_t>(group.size());
  at::parallel_for(0, tiles * projections, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(kTile * max_rank);
    std::vector<vf> partial(kTile * max_rank + kLanes);  // shrink's vector sums before their lanes are summed
    // item -> its slot's A and B blocks, rows [:r]
    auto blocks = [&](int64_t item, const float*& a, const float*& b, int64_t& r) {
      const Projection& p = group[item % projections];
      const int64_t s = slp[starts[item / projections]];
      a = p.a + s * max_rank * in;
      b = p.b + s * max_rank * p.out;
      r = rp[s];
    };
    const float* previous_b = nullptr;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / projections;
      const Projection& p = group[item % projections];
      const int64_t first = starts[i], count = starts[i + 1] - first;
      const float *a, *b;
      int64_t r;
      blocks(item, a, b, r);
      Prefetch own_b = b == previous_b ? Prefetch() : Prefetch(b, r * p.out), next_a;
      if (item + 1 < end) {
        const float *next, *next_b;
        int64_t next_r;
        blocks(item + 1, next, next_b, next_r);
        if (next != a) next_a = Prefetch(next, next_r * in);
      }
      previous_b = b;
      dispatch<kTile>(count, [&](auto T) {
        tile<T.value>(p.y, xp, a, b, p.scale[slp[first]], r, in, p.out, tp + first, h.data(), partial.data(), own_b,
                      next_a);
      });
    }
  });
}

// Without the GIL, as torch's own ops: the server's other threads go on meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_bgmv", &lora_bgmv, py::call_guard<py::gil_scoped_release>());
}
""", cpu_extension.LORA_TILES)
"""The kernel's C++ source (after cpu_vectors.h), compiled on first use."""


CFLAGS = ("-ffp-contract=off",)
"""Every product is rounded as written or fused explicitly (`fmadd`), whatever the tile."""


@functools.cache
def _extension():
    """The compiled kernel module, or None when it cannot be built here."""
    return cpu_extension.build("lora_bgmv", _SOURCE, CFLAGS)


def available() -> bool:
    return _extension() is not None


def lora_cpu(y: torch.Tensor, x: torch.Tensor, slots: LoraSlots, batch: LoraBatch) -> torch.Tensor:
    """Same result as `lora_reference` for float32 tensors on the CPU; returns y (updated in place)."""
    return lora_cpu_group([y], x, SlotSet([slots]), batch)[0]


def lora_cpu_group(ys: list[torch.Tensor], x: torch.Tensor, slot_set: SlotSet, batch: LoraBatch
                   ) -> list[torch.Tensor]:
    """`lora_cpu(ys[i], x, slot_set.slots[i], batch)` for every projection i of a group that reads the same x (a
    layer's q, k and v; gate and up), the same bits, in one kernel call: one pass of the threads instead of one per
    projection. Returns ys (updated in place)."""
    if batch.has_adapters:
        _extension().lora_bgmv(ys, x.contiguous(), slot_set.As, slot_set.Bs, slot_set.scales, batch.slot_ranks,
                               batch.groups.token_index, batch.grouped_slots)
    return ys
