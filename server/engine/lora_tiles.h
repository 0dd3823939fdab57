// The multi-LoRA op's tiles, shared by the LoRA kernel (lora_cpu: shrink and expand in one pass of the threads) and
// the fused NF4 kernel (nf4_cpu's Nf4Group: the shrink in one pass, the expand with the base rows each thread
// computed). cpu_extension.with_vectors(source, LORA_TILES) puts this text ahead of a kernel's source, after
// cpu_vectors.h. Each (token, output) result runs the same operations in the same order whichever kernel, tile or
// column range computes it, so the two kernels give the same bits.
#include <vector>

// Tokens of one slot computed together: each weight load feeds kTile FMAs (8 where 32 registers hold their
// accumulators, 4 with AVX2's 16).
constexpr int kTile = kRegisters == 32 ? 8 : 4;
// Rows of A (shrink) or vectors of outputs (expand) computed together for T tokens: enough independent
// accumulators to keep both FMA pipes busy (half the registers), few enough to stay in registers with the
// tokens' vectors.
template <int T> constexpr int kShrinkRows = std::max(1, kRegisters / 2 / T);
template <int T> constexpr int kExpandVecs = kRegisters == 32 ? (T <= 2 ? 8 / T : 2) : (T == 1 ? 4 : 2);

// Weights a tile reads next, fetched a cache line per step while it computes: a decode step reads each adapter from
// memory (one tile each), and the expand's 16 rows of B at once are more streams than the hardware prefetcher follows.
// `steps`: the steps the fetches are spread over (lines / steps a step, at least one), 0: one line a step.
struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t per_step = 1;
  Prefetch() = default;
  Prefetch(const float* begin, int64_t floats, int64_t steps = 0)
      : next(reinterpret_cast<const char*>(begin)), end(reinterpret_cast<const char*>(begin + floats)),
        per_step(steps > 0 ? std::max<int64_t>(1, (floats * 4 / 64 + steps - 1) / steps) : 1) {}
  inline void step() {
    for (int64_t i = 0; i < per_step && next < end; ++i) {
      __builtin_prefetch(next);
      next += 64;
    }
  }
};

// Where the tiles of tokens begin: up to kTile adjacent tokens of the same slot (slots[k], k < n), then n.
static inline std::vector<int64_t> slot_tiles(const int64_t* slots, int64_t n) {
  std::vector<int64_t> starts;
  for (int64_t k = 0; k < n;) {
    starts.push_back(k);
    const int64_t limit = std::min(n, k + kTile);
    const int64_t slot = slots[k];
    while (++k < limit && slots[k] == slot) {}
  }
  starts.push_back(n);
  return starts;
}

// partial[(j - j0) * T + t] = lanes of the sums A[j] . x[t] over the vector part of k, for R rows j0.. of A and
// T tokens. Each lane sums its k in the same order whatever R and T are.
template <int R, int T>
static inline void shrink_rows(const float* a, const float* const* xs, int64_t in, int64_t j0, vf* partial,
                               Prefetch& ahead) {
  const int64_t inv = in - in % kLanes;
  vf acc[R][T] = {};
  for (int64_t i = 0; i < inv; i += kLanes) {
    ahead.step();
    vf xv[T];
    for (int t = 0; t < T; ++t) {
      xv[t] = loadv(xs[t] + i);
      if constexpr (R > 1) in_register(xv[t]);  // loaded once for the R rows
    }
    for (int j = 0; j < R; ++j) {
      vf av = loadv(a + (j0 + j) * in + i);
      if constexpr (T > 1) in_register(av);  // and each row once for the T tokens
      for (int t = 0; t < T; ++t) acc[j][t] = fmadd(av, xv[t], acc[j][t]);
    }
  }
  for (int j = 0; j < R; ++j)
    for (int t = 0; t < T; ++t) partial[j * T + t] = acc[j][t];
}

// h[t * hs + j] = scale * A[j] . x[t] for the r rows of A and T tokens: vector lanes summed kLanes sums at a time
// (`sum_lanes`), then the tail of k in order. A token's result does not depend on its batch.
template <int T>
static inline void shrink(const float* a, const float* const* xs, int64_t in, int64_t r, float scale, float* h,
                          int64_t hs, vf* partial, Prefetch& ahead) {
  constexpr int R = kShrinkRows<T>;
  for (int64_t j = 0; j < r; j += R)  // each row of A read once for the tile's tokens
    dispatch<R>(std::min<int64_t>(R, r - j),
                [&](auto rows) { shrink_rows<rows.value, T>(a, xs, in, j, partial + j * T, ahead); });
  const int64_t n = r * T, inv = in - in % kLanes;
  for (int64_t p = n; p % kLanes; ++p) partial[p] = vf{};
  float sums[kLanes];
  for (int64_t p0 = 0; p0 < n; p0 += kLanes) {
    sum_lanes(partial + p0, sums);
    for (int64_t p = p0; p < std::min(n, p0 + kLanes); ++p) {
      const int64_t j = p / T, t = p % T;
      float dot = sums[p - p0];
      for (int64_t i = inv; i < in; ++i) dot += a[j * in + i] * xs[t][i];
      h[t * hs + j] = dot * scale;
    }
  }
}

// ys[t][o0 + v * kLanes ...] += h[t] @ B[:r] for V output vectors from o0 and T tokens (h[t * hs + k]): each output
// starts from y and adds h[t][k] * B[k] for k = 0, 1, ... in one fused multiply-add each.
template <int V, int T>
static inline void expand_vecs(const float* b, const float* h, int64_t hs, float* const* ys, int64_t r, int64_t out,
                               int64_t o0, Prefetch& ahead) {
  vf acc[V][T];
  for (int v = 0; v < V; ++v)
    for (int t = 0; t < T; ++t) acc[v][t] = loadv(ys[t] + o0 + v * kLanes);
  for (int64_t k = 0; k < r; ++k) {
    ahead.step();
    const float* brow = b + k * out + o0;
    for (int v = 0; v < V; ++v) {
      vf bv = loadv(brow + v * kLanes);
      if constexpr (T > 1) in_register(bv);  // loaded once for the T tokens
      for (int t = 0; t < T; ++t) acc[v][t] = fmadd(splat(h[t * hs + k]), bv, acc[v][t]);
    }
  }
  for (int v = 0; v < V; ++v)
    for (int t = 0; t < T; ++t) storev(ys[t] + o0 + v * kLanes, acc[v][t]);
}

// The expand over outputs [o0, o1) of T tokens: whole vectors from o0, then the last < kLanes outputs one by one,
// each with the operations a vector lane gives it (`fmadd` rounds once: __builtin_fmaf), wherever it lies.
template <int T>
static inline void expand_range(const float* b, const float* h, int64_t hs, float* const* ys, int64_t r, int64_t out,
                                int64_t o0, int64_t o1, Prefetch& ahead) {
  constexpr int V = kExpandVecs<T>;
  const int64_t whole = o0 + (o1 - o0) / kLanes * kLanes;
  for (int64_t o = o0; o < whole; o += V * kLanes)  // outputs of T tokens stay in registers over r rows of B
    dispatch<V>(std::min<int64_t>(V, (whole - o) / kLanes),
                [&](auto vecs) { expand_vecs<vecs.value, T>(b, h, hs, ys, r, out, o, ahead); });
  for (int t = 0; t < T; ++t)
    for (int64_t o = whole; o < o1; ++o) {
      float acc = ys[t][o];
      for (int64_t k = 0; k < r; ++k) acc = __builtin_fmaf(h[t * hs + k], b[k * out + o], acc);
      ys[t][o] = acc;
    }
}
