// What the engine's C++ CPU kernels share: registers of floats as wide as the CPU's and the few operations on them
// every kernel uses. cpu_extension.with_vectors puts this text ahead of a kernel's source, so it is compiled (and
// keyed) with it: the vector path is chosen at compile time from the host CPU's flags (-march=native).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// One register of floats: 16 lanes with AVX-512, 8 elsewhere (AVX2; two SSE or NEON registers otherwise).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32;
#else
constexpr int kLanes = 8, kRegisters = 16;
#endif
typedef float vf __attribute__((vector_size(kLanes * 4), aligned(4)));
static inline vf loadv(const float* p) { return *reinterpret_cast<const vf*>(p); }
static inline void storev(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
// s in every lane: one broadcast (from memory where s is there). `vf{} + s` would also add 0.0 to s, an add (and
// with AVX2 a register broadcast) in each inner loop that splats.
static inline vf splat(float s) {
#if defined(__AVX512F__)
  return static_cast<vf>(_mm512_set1_ps(s));
#elif defined(__AVX2__)
  return static_cast<vf>(_mm256_set1_ps(s));
#else
  vf v;
  for (int i = 0; i < kLanes; ++i) v[i] = s;
  return v;
#endif
}

// Keeps v in a register from here: the compiler may no longer fold its load into each instruction that reads it. It
// does fold a value read by a few FMAs (each FMA then loads it again), which makes a tile loop load-bound: with
// AVX2 a 4 x 2 tile would load 10 vectors for 8 FMAs instead of 6.
static inline void in_register(vf& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__AVX2__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

// a * b + c rounded once, in every instantiation alike (kernels are built with -ffp-contract=off: the compiler
// fusing some products and not others would make a token's bits depend on its tile).
static inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return static_cast<vf>(_mm512_fmadd_ps(static_cast<__m512>(a), static_cast<__m512>(b), static_cast<__m512>(c)));
#elif defined(__AVX2__) && defined(__FMA__)
  return static_cast<vf>(_mm256_fmadd_ps(static_cast<__m256>(a), static_cast<__m256>(b), static_cast<__m256>(c)));
#else
  for (int i = 0; i < kLanes; ++i) c[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return c;
#endif
}

// out[n] = the lanes of v[n] summed, n < kLanes, in one fixed tree for every vector: lane i + lane i + w for
// w = kLanes / 2, ..., 1. With AVX-512 or AVX2 the kLanes sums come out of one butterfly of shuffles (15 adds
// for 16 vectors, not 16 x 15); the plain build runs the same tree one vector at a time: the same bits.
static inline void sum_lanes(const vf* v, float* out) {
#if defined(__AVX512F__)
  __m512 u[8], w[4], z[2];
  for (int m = 0; m < 8; ++m) {  // w = 8: 256-bit halves of v[2m] and v[2m + 1]
    const __m512 a = static_cast<__m512>(v[2 * m]), b = static_cast<__m512>(v[2 * m + 1]);
    u[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int m = 0; m < 4; ++m)  // w = 4: each 128-bit quarter now holds one vector's partial sums
    w[m] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * m], u[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * m], u[2 * m + 1], 0xDD));
  for (int m = 0; m < 2; ++m)  // w = 2
    z[m] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * m], w[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * m], w[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),  // w = 1
                                    _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sums);
  for (int n = 0; n < 16; ++n) out[n] = lanes[(n % 4) * 4 + n / 4];  // lane p holds vector (p % 4) * 4 + p / 4
#elif defined(__AVX2__)
  __m256 u[4], z[2];
  for (int m = 0; m < 4; ++m) {  // w = 4: 128-bit halves of v[2m] and v[2m + 1]
    const __m256 a = static_cast<__m256>(v[2 * m]), b = static_cast<__m256>(v[2 * m + 1]);
    u[m] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  for (int m = 0; m < 2; ++m)  // w = 2
    z[m] = _mm256_add_ps(_mm256_shuffle_ps(u[2 * m], u[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(u[2 * m], u[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),  // w = 1
                                    _mm256_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sums);
  for (int n = 0; n < 8; ++n) out[n] = lanes[(n % 2) * 4 + n / 2];  // lane p holds vector (p % 4) * 2 + p / 4
#else
  for (int n = 0; n < kLanes; ++n) {
    float t[kLanes];
    for (int i = 0; i < kLanes; ++i) t[i] = v[n][i];
    for (int w = kLanes / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) t[i] = t[i] + t[i + w];
    out[n] = t[0];
  }
#endif
}

// Calls f(std::integral_constant<int, n>) for a run-time n in [1, Max]: tile sizes are template arguments.
template <int Max, class F>
static inline void dispatch(int64_t n, F&& f) {
  if constexpr (Max > 1) {
    if (n < Max) return dispatch<Max - 1>(n, f);
  }
  f(std::integral_constant<int, Max>{});
}

