"""Fused NF4 matmul for the CPU: `y = x @ dequant(W).T (+ b)` straight from bitsandbytes' packed data.

bitsandbytes' CPU path dequantizes the whole weight into a new float tensor on every call, then runs
a separate matmul; for a decode step of a few tokens that reads and writes 8 bytes per weight to
save nothing. This kernel reads the packed 4-bit weight (half a byte per weight plus one byte of
nested absmax per 64) and, for each tile of 4 output rows:

1. dequantizes the rows into an L1-resident buffer: per 64-weight block, the block's absmax is
   `code2[qabsmax[b]] * absmax2[b / blocksize2] + offset` (two float32 roundings, exactly as
   bitsandbytes computes it), the 16 NF4 values times that absmax form a 16-entry table in
   registers, and each nibble picks its value from it (`vpermps`); element f of the flattened
   [out, in] weight is the high nibble of byte f / 2 when f is even, the low one when odd. So every
   dequantized value is bit-identical to `bitsandbytes.functional.dequantize_4bit`'s (rounded to
   bfloat16 first when the compute dtype is bfloat16, as bitsandbytes does);
2. multiplies them against every token of x, tiles of 3 (AVX2) or 4 (AVX-512) tokens sharing each
   weight load, float32 FMA accumulation; threads split the output rows.

Above `blas_min_tokens` tokens (prefill) the weight's dequantization is amortized over many tokens
and BLAS outruns the hand loop, so the kernel dequantizes the whole weight (same code, into a
reused per-thread buffer) and calls `addmm`. The threshold is measured by
`benchmarks/engine_throughput.py` (microbenchmark columns "fused_loop" vs "fused_blas") and set in
`BLAS_MIN_TOKENS`.

The kernel is compiled on first use for the host CPU (`cpu_extension`); on a CPU with AVX-512 the
table lookup and the FMAs run on 16 lanes, with AVX2 on 8, elsewhere in plain C++. Weights whose
in_features is not a multiple of 16 are not handled (`supports` says False): they keep
bitsandbytes' path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch

from loraplex.server.engine import cpu_extension

#: Token counts from which the kernel dequantizes the whole weight and calls BLAS instead of its own loop.
BLAS_MIN_TOKENS = 48

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
constexpr int kLanes = 16, kTokenTile = 4;
#else
constexpr int kLanes = 8, kTokenTile = 3;
#endif
constexpr int kRowTile = 4;   // weight rows dequantized together, each load feeds kTokenTile FMAs
constexpr int64_t kBlock = 64;  // NF4 blocksize
typedef float vf __attribute__((vector_size(kLanes * 4), aligned(4)));
static inline vf loadv(const float* p) { return *reinterpret_cast<const vf*>(p); }
static inline float hsum(vf v) { float s = 0; for (int i = 0; i < kLanes; ++i) s += v[i]; return s; }

struct Nf4 {  // one packed weight [N, K] as bitsandbytes stores it (double-quantized, blocksize 64)
  const uint8_t* packed; const uint8_t* qabsmax; const float* absmax2; const float* code2; const float* code;
  float offset; int64_t blocksize2, N, K; bool bf16;
};

static inline float round_bf16(float v) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t u; std::memcpy(&u, &v, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &u, 4);
  return v;
}

static inline float block_absmax(const Nf4& w, int64_t b) {
  volatile float scaled = w.code2[w.qabsmax[b]] * w.absmax2[b / w.blocksize2];  // rounded before the add
  return scaled + w.offset;
}

// Dequantize row o (K values, K % 16 == 0) into dst.
static void dequant_row(const Nf4& w, int64_t o, float* dst) {
  const int64_t first = o * w.K;
  for (int64_t k = 0; k < w.K;) {
    const int64_t b = (first + k) / kBlock, end = std::min(w.K, (b + 1) * kBlock - first);
    const float a = block_absmax(w, b);
    alignas(64) float table[16];
    for (int j = 0; j < 16; ++j) table[j] = w.bf16 ? round_bf16(w.code[j] * a) : w.code[j] * a;
#if defined(__AVX512F__)
    const __m512 t16 = _mm512_load_ps(table);
#elif defined(__AVX2__)
    const __m256 tlo = _mm256_load_ps(table), thi = _mm256_load_ps(table + 8);
#endif
    for (; k < end; k += 16) {
      const uint8_t* p = w.packed + (first + k) / 2;
      float* d = dst + k;
#if defined(__AVX2__) || defined(__AVX512F__)
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      const __m128i mask = _mm_set1_epi8(0x0F);
      const __m128i nibbles = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
                                                _mm_and_si128(bytes, mask));  // h0 l0 h1 l1 ...
#endif
#if defined(__AVX512F__)
      _mm512_storeu_ps(d, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles), t16));
#elif defined(__AVX2__)
      const __m256i i0 = _mm256_cvtepu8_epi32(nibbles), i1 = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(nibbles, nibbles));
      _mm256_storeu_ps(d, _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, i0), _mm256_permutevar8x32_ps(thi, i0),
                                           _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28))));
      _mm256_storeu_ps(d + 8, _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, i1), _mm256_permutevar8x32_ps(thi, i1),
                                               _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28))));
#else
      for (int j = 0; j < 8; ++j) { d[2 * j] = table[p[j] >> 4]; d[2 * j + 1] = table[p[j] & 15]; }
#endif
    }
  }
}

// The whole weight into dst [N, K], threads over rows.
static void dequant_all(const Nf4& w, float* dst) {
  at::parallel_for(0, w.N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) dequant_row(w, o, dst + o * w.K);
  });
}

// y[t, r] = w[r] . x[t] for R rows of w (stride K) and T tokens of x (stride K); y has stride N.
template <int R, int T>
static inline void dot_tile(const float* w, const float* x, int64_t K, float* y, int64_t N) {
  vf acc[R][T] = {};
  for (int64_t k = 0; k < K; k += kLanes) {
    vf xv[T];
    for (int t = 0; t < T; ++t) xv[t] = loadv(x + t * K + k);
    for (int r = 0; r < R; ++r) {
      const vf wv = loadv(w + r * K + k);
      for (int t = 0; t < T; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * N + r] = hsum(acc[r][t]);
}

template <int R>
static void rows_times_tokens(const float* w, const float* x, int64_t M, int64_t K, float* y, int64_t N) {
  int64_t t = 0;
  for (; t + kTokenTile <= M; t += kTokenTile) dot_tile<R, kTokenTile>(w, x + t * K, K, y + t * N, N);
  switch (M - t) {
    case 1: dot_tile<R, 1>(w, x + t * K, K, y + t * N, N); break;
    case 2: dot_tile<R, 2>(w, x + t * K, K, y + t * N, N); break;
#if defined(__AVX512F__)
    case 3: dot_tile<R, 3>(w, x + t * K, K, y + t * N, N); break;
#endif
    default: break;
  }
}

static Nf4 describe(torch::Tensor packed, torch::Tensor qabsmax, torch::Tensor absmax2, torch::Tensor code2,
                    torch::Tensor code, double offset, int64_t blocksize2, int64_t N, int64_t K, bool bf16) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && qabsmax.scalar_type() == at::kByte, "uint8 packed data and absmax");
  TORCH_CHECK(absmax2.scalar_type() == at::kFloat && code2.scalar_type() == at::kFloat &&
              code.scalar_type() == at::kFloat, "float32 quantization state");
  TORCH_CHECK(packed.is_contiguous() && qabsmax.is_contiguous() && absmax2.is_contiguous(), "contiguous state");
  TORCH_CHECK(K % 16 == 0 && packed.numel() * 2 == N * K && code.numel() == 16, "NF4 weight of [N, K], K % 16 == 0");
  return Nf4{packed.data_ptr<uint8_t>(), qabsmax.data_ptr<uint8_t>(), absmax2.data_ptr<float>(),
             code2.data_ptr<float>(), code.data_ptr<float>(), static_cast<float>(offset), blocksize2, N, K, bf16};
}

// The whole weight dequantized, [N, K] float32 (bfloat16-rounded values when bf16).
torch::Tensor nf4_dequantize(torch::Tensor packed, torch::Tensor qabsmax, torch::Tensor absmax2, torch::Tensor code2,
                             torch::Tensor code, double offset, int64_t blocksize2, int64_t N, int64_t K, bool bf16) {
  const Nf4 w = describe(packed, qabsmax, absmax2, code2, code, offset, blocksize2, N, K, bf16);
  torch::Tensor out = torch::empty({N, K}, torch::kFloat);
  dequant_all(w, out.data_ptr<float>());
  return out;
}

// y = x @ dequant(W).T (+ bias): x [M, K] in the compute dtype (float32 or bfloat16), y [M, N] likewise.
torch::Tensor nf4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor qabsmax, torch::Tensor absmax2,
                         torch::Tensor code2, torch::Tensor code, double offset, int64_t blocksize2, int64_t N,
                         c10::optional<torch::Tensor> bias, int64_t blas_min_tokens) {
  TORCH_CHECK(x.dim() == 2, "x must be [tokens, in_features]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float32 or bfloat16 activations");
  const int64_t M = x.size(0), K = x.size(1);
  const Nf4 w = describe(packed, qabsmax, absmax2, code2, code, offset, blocksize2, N, K, dtype == at::kBFloat16);
  const torch::Tensor xf = x.to(torch::kFloat).contiguous();
  torch::Tensor y;
  if (M >= blas_min_tokens) {
    static thread_local torch::Tensor scratch;
    if (!scratch.defined() || scratch.numel() < N * K) scratch = torch::empty({N * K}, torch::kFloat);
    dequant_all(w, scratch.data_ptr<float>());
    const torch::Tensor weight = scratch.narrow(0, 0, N * K).view({N, K});
    y = bias.has_value() ? at::addmm(bias->to(torch::kFloat), xf, weight.t()) : at::mm(xf, weight.t());
  } else {
    y = torch::empty({M, N}, torch::kFloat);
    const float* xp = xf.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int64_t tiles = (N + kRowTile - 1) / kRowTile;
    at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> rows(kRowTile * K);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t o = tile * kRowTile, count = std::min<int64_t>(kRowTile, N - o);
        for (int64_t r = 0; r < count; ++r) dequant_row(w, o + r, rows.data() + r * K);
        switch (count) {
          case 1: rows_times_tokens<1>(rows.data(), xp, M, K, yp + o, N); break;
          case 2: rows_times_tokens<2>(rows.data(), xp, M, K, yp + o, N); break;
          case 3: rows_times_tokens<3>(rows.data(), xp, M, K, yp + o, N); break;
          default: rows_times_tokens<kRowTile>(rows.data(), xp, M, K, yp + o, N); break;
        }
      }
    });
    if (bias.has_value()) y.add_(bias->to(torch::kFloat));
  }
  return dtype == at::kFloat ? y : y.to(dtype);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nf4_linear", &nf4_linear);
  m.def("nf4_dequantize", &nf4_dequantize);
}
"""


@functools.cache
def _extension():
    """The compiled kernel module, or None when it cannot be built here."""
    # fp-contract=fast turns the tile loops' `acc += w * x` into FMAs (C++17 mode would not); the
    # absmax computation keeps its two roundings through a volatile intermediate.
    return cpu_extension.build("nf4_linear", _SOURCE, ("-ffp-contract=fast",))


def available() -> bool:
    return _extension() is not None


@dataclass(frozen=True)
class Nf4Weight:
    """A bitsandbytes NF4 weight [out_features, in_features] in the pieces the kernel reads."""

    packed: torch.Tensor
    """[out * in / 2] uint8: two 4-bit codes per byte, high nibble first."""
    qabsmax: torch.Tensor
    """[out * in / 64] uint8: each block's absmax, quantized by the nested 8-bit state."""
    absmax2: torch.Tensor
    """[blocks / blocksize2] float32: the nested state's absmax."""
    code2: torch.Tensor
    """[256] float32: the nested state's 8-bit code."""
    code: torch.Tensor
    """[16] float32: the NF4 values."""
    offset: float
    blocksize2: int
    out_features: int
    in_features: int

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, state: bnbf.QuantState) -> Nf4Weight:
        if not state.nested or state.blocksize != 64 or state.quant_type != "nf4":
            raise ValueError("the fused NF4 kernel reads double-quantized NF4 with blocksize 64")
        out_features, in_features = state.shape
        nested = state.state2
        return cls(packed.reshape(-1).contiguous(), state.absmax.contiguous(), nested.absmax.float().contiguous(),
                   nested.code.float().contiguous(), state.code.float().contiguous(), float(state.offset),
                   nested.blocksize, out_features, in_features)

    def _state_args(self) -> tuple:
        return (self.packed, self.qabsmax, self.absmax2, self.code2, self.code, self.offset, self.blocksize2,
                self.out_features)


def supports(weight_shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel serves a weight of this [out, in] shape, device and compute dtype."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and weight_shape[1] % 16 == 0


def nf4_linear(x: torch.Tensor, weight: Nf4Weight, bias: torch.Tensor | None = None,
               blas_min_tokens: int = BLAS_MIN_TOKENS) -> torch.Tensor:
    """x: [num_tokens, in] -> [num_tokens, out] = x @ dequant(W).T (+ bias), in x's dtype."""
    return _extension().nf4_linear(x, *weight._state_args(), bias, blas_min_tokens)


def nf4_dequantize(weight: Nf4Weight, bf16: bool = False) -> torch.Tensor:
    """The weight's values [out, in] float32, as the kernel computes them (bfloat16-rounded with `bf16`)."""
    return _extension().nf4_dequantize(*weight._state_args(), weight.in_features, bf16)
