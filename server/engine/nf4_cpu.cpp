// The fused NF4 matmul's C++ source: see nf4_cpu.py for what it computes and how it is built.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <string>
#include <vector>
#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// A tile of kRowTile weight rows times kTokenTile<W> tokens keeps its accumulators, the tokens' vectors
// and one weight vector in registers (16 with AVX2, 32 with AVX-512), each vector loaded once (`in_register`):
// 6 loads for 9 FMAs with AVX2's 3 x 3. Larger tiles spill, or, unpinned, load each token vector once per row
// (3 x 4: 15 loads for 12 FMAs); the pinned 3 x 3 runs 1.03-1.12x that 3 x 4 at 8-64 tokens on SmolLM2's
// shapes (Zen 3). bfloat16 rows (W = uint16_t: the lm_head) are widened on load, a shuffle each, and keep
// 3 x 4 with the token vectors unpinned: 1.15x the 3 x 3 there.
constexpr int kRowTile = kRegisters == 32 ? 4 : 3;
template <class W> constexpr int kTokenTile = kRegisters == 32 || std::is_same_v<W, uint16_t> ? 4 : 3;
template <class W> constexpr bool kPinTokens = kRegisters == 32 || std::is_same_v<W, float>;
constexpr int kGroup = 32;      // weights decoded together: 16 packed bytes, always inside one NF4 block
constexpr int kVecs = kGroup / kLanes;
constexpr int64_t kBlock = 64;  // NF4 blocksize
typedef uint32_t vu __attribute__((vector_size(kLanes * 4), aligned(4)));  // vf's lanes as bits

static inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(static_cast<__m512>(v));
#elif defined(__AVX2__)
  const __m256 m = static_cast<__m256>(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}

// Round every lane to bfloat16 (nearest even), as torch's .to(bfloat16) does; the result stays float32.
static inline vf round_bf16(vf v) {
  vu u = reinterpret_cast<vu>(v);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return reinterpret_cast<vf>(u);
}

struct Nf4 {  // one packed weight [N, K] as bitsandbytes stores it (double-quantized, blocksize 64)
  const uint8_t* packed; const uint8_t* qabsmax; const float* absmax2; const float* code2; const float* code;
  float offset; int blocksize2_log2; int64_t N, K;  // the nested blocksize is a power of two (256)
};

// Block b's absmax: code2[qabsmax[b]] * absmax2[b / blocksize2], rounded, then + offset, rounded (the
// build passes -ffp-contract=off, so the two are not fused).
static inline float block_absmax(const Nf4& w, int64_t b) {
  return w.code2[w.qabsmax[b]] * w.absmax2[b >> w.blocksize2_log2] + w.offset;
}

// Weight i of a group (i in [0, 32), flattened index within the group) sits in lane lane_of(i) of the
// decoded vectors (vector lane_of(i) / kLanes, element lane_of(i) % kLanes). The decoders leave weights
// out of natural order: with AVX-512 the even weights in the first vector and the odd ones in the
// second; with AVX2 the even weights of each 8 in the low half of a vector and the odd ones in the high
// half. x is permuted the same way once per call so that no lane shuffle is needed per weight.
#if defined(__AVX512F__)
constexpr bool kPermuted = true;
static inline int lane_of(int i) { return (i % 2) * 16 + i / 2; }
#elif defined(__AVX2__)
constexpr bool kPermuted = true;
static inline int lane_of(int i) { return 8 * (i / 8) + (i % 2) * 4 + (i % 8) / 2; }
#else
constexpr bool kPermuted = false;
static inline int lane_of(int i) { return i; }
#endif

// Stores one decoded group's 32 weights (kVecs vectors) at dst in natural order.
static inline void store_natural(float* dst, const vf* values) {
#if defined(__AVX512F__)
  const __m512 even = static_cast<__m512>(values[0]), odd = static_cast<__m512>(values[1]);
  const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  _mm512_storeu_ps(dst, _mm512_permutex2var_ps(even, low, odd));
  _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(even, high, odd));
#elif defined(__AVX2__)
  for (int v = 0; v < kVecs; ++v) {
    const __m256 m = static_cast<__m256>(values[v]);
    const __m128 even = _mm256_castps256_ps128(m), odd = _mm256_extractf128_ps(m, 1);
    _mm_storeu_ps(dst + 8 * v, _mm_unpacklo_ps(even, odd));
    _mm_storeu_ps(dst + 8 * v + 4, _mm_unpackhi_ps(even, odd));
  }
#else
  for (int v = 0; v < kVecs; ++v) storev(dst + v * kLanes, values[v]);
#endif
}

// Decodes 32 packed weights at a time: code[nibble] * absmax, in lane order (see lane_of).
class Decoder {
 public:
  explicit Decoder(const float* code) {
#if defined(__AVX512F__)
    code_ = _mm512_loadu_ps(code);
#elif defined(__AVX2__)
    alignas(16) uint8_t planes[4][16];  // byte b of each of the 16 float32 values
    for (int j = 0; j < 16; ++j) {
      uint32_t u; std::memcpy(&u, code + j, 4);
      for (int b = 0; b < 4; ++b) planes[b][j] = static_cast<uint8_t>(u >> (8 * b));
    }
    for (int b = 0; b < 4; ++b)
      plane_[b] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(planes[b])));
#else
    std::memcpy(code_, code, sizeof(code_));
#endif
  }

  // What `decode` needs of a block's absmax. AVX-512: the block's 16 values code[j] * absmax (rounded
  // to bf16 when BF16), looked up directly; elsewhere the absmax, multiplied in after the lookup.
#if defined(__AVX512F__)
  using Scale = __m512;
  template <bool BF16>
  inline Scale scale(float absmax) const {
    const vf values = static_cast<vf>(code_) * absmax;
    return static_cast<__m512>(BF16 ? round_bf16(values) : values);
  }
#else
  using Scale = float;
  template <bool BF16>
  inline Scale scale(float absmax) const { return absmax; }
#endif

  // out[0..kVecs) = the 32 weights of the 16 bytes at p, times the block's absmax (then rounded to bf16
  // when BF16): the same float32 product code[nibble] * absmax on every path. Always inlined: GCC keeps the
  // AVX2 body out of line (a call per 32 weights, the vectors through memory: 1.3x slower on a Zen 3).
  template <bool BF16>
  __attribute__((always_inline)) inline void decode(const uint8_t* p, Scale scale, vf* out) const {
#if defined(__AVX512F__)
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    out[0] = static_cast<vf>(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), scale));  // high nibbles: even
    out[1] = static_cast<vf>(_mm512_permutexvar_ps(bytes, scale));  // vpermps reads 4 index bits: low, odd
#elif defined(__AVX2__)
    // lane 0 of `nibbles`: the high nibbles of the 16 bytes (even weights), lane 1: the low ones (odd)
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i nibbles = _mm256_and_si256(_mm256_srlv_epi32(both, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
                                             _mm256_set1_epi8(0x0F));
    __m256i bytes[4];
    for (int b = 0; b < 4; ++b) bytes[b] = _mm256_shuffle_epi8(plane_[b], nibbles);
    const __m256i lo01 = _mm256_unpacklo_epi8(bytes[0], bytes[1]), hi01 = _mm256_unpackhi_epi8(bytes[0], bytes[1]);
    const __m256i lo23 = _mm256_unpacklo_epi8(bytes[2], bytes[3]), hi23 = _mm256_unpackhi_epi8(bytes[2], bytes[3]);
    const __m256i values[4] = {_mm256_unpacklo_epi16(lo01, lo23), _mm256_unpackhi_epi16(lo01, lo23),
                               _mm256_unpacklo_epi16(hi01, hi23), _mm256_unpackhi_epi16(hi01, hi23)};
    for (int v = 0; v < 4; ++v) out[v] = static_cast<vf>(_mm256_castsi256_ps(values[v])) * scale;
    if (BF16)
      for (int v = 0; v < kVecs; ++v) out[v] = round_bf16(out[v]);
#else
    for (int i = 0; i < kGroup; ++i) out[i / kLanes][i % kLanes] = code_[(p[i / 2] >> (i % 2 ? 0 : 4)) & 15] * scale;
    if (BF16)
      for (int v = 0; v < kVecs; ++v) out[v] = round_bf16(out[v]);
#endif
  }

 private:
#if defined(__AVX512F__)
  __m512 code_;
#elif defined(__AVX2__)
  __m256i plane_[4];
#else
  float code_[16];
#endif
};

// Columns [k0, k1) of row o (multiples of 32) decoded into dst, in lane order (natural order when NATURAL).
template <bool BF16, bool NATURAL>
static void decode_range(const Nf4& w, const Decoder& dec, int64_t o, int64_t k0, int64_t k1, float* dst) {
  const int64_t first = o * w.K;
  Decoder::Scale scale{};
  for (int64_t k = k0; k < k1; k += kGroup) {
    if (k == k0 || (first + k) % kBlock == 0) scale = dec.scale<BF16>(block_absmax(w, (first + k) / kBlock));
    vf values[kVecs];
    dec.decode<BF16>(w.packed + (first + k) / 2, scale, values);
    if (NATURAL)
      store_natural(dst + k - k0, values);
    else
      for (int v = 0; v < kVecs; ++v) storev(dst + k - k0 + v * kLanes, values[v]);
  }
}

// x [M, K] with each group of 32 columns permuted into lane order (x itself when that order is natural).
static torch::Tensor to_lane_order(const torch::Tensor& x) {
  if (!kPermuted) return x;
  const int64_t M = x.size(0), K = x.size(1);
  torch::Tensor out = torch::empty({M, K}, torch::kFloat);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += kGroup)
      for (int i = 0; i < kGroup; ++i) dst[m * K + k + lane_of(i)] = src[m * K + k + i];
  return out;
}

// kLanes weights as float32: float32 ones as they are, bfloat16 ones (their bits, uint16_t) widened exactly.
static inline vf loadw(const float* p) { return loadv(p); }
static inline vf loadw(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return static_cast<vf>(_mm512_castsi512_ps(_mm512_slli_epi32(words, 16)));
#elif defined(__AVX2__)
  const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return static_cast<vf>(_mm256_castsi256_ps(_mm256_slli_epi32(words, 16)));
#else
  vu bits;
  for (int i = 0; i < kLanes; ++i) bits[i] = static_cast<uint32_t>(p[i]) << 16;
  return reinterpret_cast<vf>(bits);
#endif
}

// y[t, r] = w[r] . x[t] for R decoded rows of w (stride K) and T tokens of x (stride K), both in lane
// order; y has stride N. Every (row, token) sum runs over k in the same order as in `direct_tile`, and
// bfloat16 rows (W = uint16_t) give the bits float32 rows of the same values give.
template <int R, int T, class W>
static inline void dot_tile(const W* w, const float* x, int64_t K, float* y, int64_t N) {
  vf acc[R][T] = {};
  for (int64_t k = 0; k < K; k += kLanes) {
    vf xv[T];
    for (int t = 0; t < T; ++t) {
      xv[t] = loadv(x + t * K + k);
      if constexpr (R > 1 && kPinTokens<W>) in_register(xv[t]);
    }
    for (int r = 0; r < R; ++r) {
      vf wv = loadw(w + r * K + k);
      if constexpr (T > 1) in_register(wv);
      for (int t = 0; t < T; ++t) acc[r][t] = fmadd(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * N + r] = hsum(acc[r][t]);
}

// Rows [o, o + R) times all T tokens, decoding each group of weights into registers and using it at once.
template <int R, int T, bool BF16>
static void direct_tile(const Nf4& w, const Decoder& dec, int64_t o, const float* x, float* y) {
  const int64_t K = w.K;
  vf acc[R][T] = {};
  Decoder::Scale scale[R];
  for (int64_t k = 0; k < K; k += kGroup) {
    for (int r = 0; r < R; ++r) {
      const int64_t at = (o + r) * K + k;
      if (k == 0 || at % kBlock == 0) scale[r] = dec.scale<BF16>(block_absmax(w, at / kBlock));
      vf values[kVecs];
      dec.decode<BF16>(w.packed + at / 2, scale[r], values);
      for (int v = 0; v < kVecs; ++v)
        for (int t = 0; t < T; ++t) acc[r][t] = fmadd(values[v], loadv(x + t * K + k + v * kLanes), acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * w.N + o + r] = hsum(acc[r][t]);
}

// ---- bfloat16 weights decoded with AVX512-BF16 (for AMX): one vpermw per 32 weights from a per-block table ----
#if defined(__AVX512BF16__)
constexpr bool kHasAvx512Bf16 = true;

// Word j of a decoded bf16 group holds the group's weight bf16_weight_of(j): the low 16 words the odd
// weights (byte j's low nibble), the high 16 the even ones (byte j - 16's high nibble). x is permuted the
// same way once per call; the bf16 dot products (AMX) then sum words 2i and 2i + 1 together.
static inline int bf16_weight_of(int j) { return j < 16 ? 2 * j + 1 : 2 * (j - 16); }

class Bf16Decoder {
 public:
  explicit Bf16Decoder(const float* code)
      : code_(_mm512_loadu_ps(code)),
        shifts_(_mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1)) {}

  // The block's 16 values code[j] * absmax (the float32 product, rounded to bfloat16 as torch rounds),
  // in words j and j + 16: a nibble indexes it with or without the bit above it.
  inline __m512i table(float absmax) const {
    const __m256i half = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(code_, _mm512_set1_ps(absmax)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
  }

  // The 32 weights of the 16 bytes at p, in bf16_weight_of order, looked up in `table` (one vpermw).
  inline __m512i decode(const uint8_t* p, __m512i table) const {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(p))));  // words [b0..b15, b0..b15]
    return _mm512_permutexvar_epi16(_mm512_srlv_epi16(bytes, shifts_), table);  // vpermw reads 5 index bits
  }

 private:
  __m512 code_;
  __m512i shifts_;  // 0 for the low 16 words (low nibble, via the 5-bit index), 4 for the high 16
};

// Row o of the weight decoded into dst [K] as bfloat16, each group of 32 in bf16_weight_of order.
static void decode_row_bf16(const Nf4& w, const Bf16Decoder& dec, int64_t o, uint16_t* dst) {
  __m512i table = _mm512_setzero_si512();
  for (int64_t k = 0; k < w.K; k += kGroup) {
    const int64_t at = o * w.K + k;
    if (k == 0 || at % kBlock == 0) table = dec.table(block_absmax(w, at / kBlock));
    _mm512_storeu_si512(dst + k, dec.decode(w.packed + at / 2, table));
  }
}
#else
constexpr bool kHasAvx512Bf16 = false;
#endif

// ---- bfloat16 compute on AMX: 16 weight rows x 16 tokens x 32 k per tile instruction ----
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr int kTile = 16;  // output rows of a weight tile, tokens of a token tile, k pairs of a step

// Whether this process may use AMX: Linux hands out the tile data state on request, once per process.
static bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // asm/prctl.h, the XSAVE feature number
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

// Tiles 0-3 (float32 sums, 16 rows x 16 tokens), 4-5 (16 weight rows x 32 bf16) and 6-7 (16 k pairs x
// 16 tokens x 2 bf16): 16 rows of 64 bytes each. The config is per thread: loaded by each worker first.
static void configure_tiles() {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config = {};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) { config.colsb[t] = 64; config.rows[t] = kTile; }
  _tile_loadconfig(&config);
}

// x [M, K] bf16 as AMX's B operand: per token tile mt and group kc of 32 columns, 16 k pairs x 16 tokens x
// 2 words, the columns of each group in bf16_weight_of order (as the decoded weights), zeros past token M.
static torch::Tensor to_amx_tiles(const torch::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), tiles = (M + kTile - 1) / kTile, groups = K / kGroup;
  torch::Tensor out = torch::empty({tiles * groups * kTile * 2 * kTile}, torch::kBFloat16);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<at::BFloat16>());  // [tiles, groups, 16 pairs, 16]
  alignas(64) uint16_t order[kGroup];
  for (int j = 0; j < kGroup; ++j) order[j] = static_cast<uint16_t>(bf16_weight_of(j));
  const __m512i permute = _mm512_load_si512(order);
  const __m512i pair_rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(kTile));  // pair kp at dword kp * 16
  at::parallel_for(0, tiles * kTile, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t kc = 0; kc < groups; ++kc) {
        uint32_t* tile = dst + ((m / kTile) * groups + kc) * kTile * kTile + m % kTile;
        const __m512i words = m < M ? _mm512_permutexvar_epi16(permute, _mm512_loadu_si512(src + m * K + kc * kGroup))
                                    : _mm512_setzero_si512();
        _mm512_i32scatter_epi32(tile, pair_rows, words, 4);  // dword kp (words 2kp, 2kp + 1) to pair row kp
      }
  });
  return out;
}

// One group of 32 columns: the pass's two 16-row A tiles (at a and a + 16 rows, row stride `stride` words)
// times TT token tiles (at b, then b + b_next words) into sums tiles rt + 2 * tt.
template <int TT>
static inline void amx_group(const uint16_t* a, int64_t stride, const uint16_t* b, int64_t b_next) {
  _tile_loadd(4, a, stride * 2);
  _tile_loadd(5, a + kTile * stride, stride * 2);
  _tile_loadd(6, b, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 5, 6);
  if constexpr (TT == 2) {
    _tile_loadd(7, b + b_next, 64);
    _tile_dpbf16ps(2, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// y [M, N] = x (AMX tiles) times the weight, threads over passes of 32 rows, each pass's tokens in blocks
// of two 16-token tiles (four sums tiles: 2 row tiles x 2 token tiles). Up to 32 tokens each group of the
// pass's rows is decoded into a 2 KiB buffer just before its products (it stays in L1); above, the pass's
// rows are decoded once into a [32, K] buffer that every token block reads. Either way every (row, token)
// sum runs over the groups in order inside AMX, and depends only on that row and token: a token's result
// does not depend on its batch.
static void amx_loop(const Nf4& w, const uint16_t* xt, int64_t M, float* y) {
  constexpr int64_t kPass = 2 * kTile, kTileWords = kTile * 2 * kTile;
  const Bf16Decoder dec(w.code);
  const int64_t K = w.K, N = w.N, groups = K / kGroup, token_tiles = (M + kTile - 1) / kTile;
  const bool per_group = token_tiles <= 2;
  at::parallel_for(0, (N + kPass - 1) / kPass, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    std::vector<uint16_t> rows(kPass * (per_group ? kGroup : K));  // [32, 32] or [32, K]; rows past N unused
    __m512i tables[kPass];
    alignas(64) float sums[4][kTile * kTile];  // [tile][row, token]
    for (int64_t pass = begin; pass < end; ++pass) {
      const int64_t o = pass * kPass, count = std::min<int64_t>(kPass, N - o);
      if (!per_group)
        for (int64_t r = 0; r < count; ++r) decode_row_bf16(w, dec, o + r, rows.data() + r * K);
      for (int64_t mt = 0; mt < token_tiles; mt += 2) {
        const int64_t pair = std::min<int64_t>(2, token_tiles - mt);
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t kc = 0; kc < groups; ++kc) {
          if (per_group)
            for (int64_t r = 0; r < count; ++r) {
              const int64_t at = (o + r) * K + kc * kGroup;
              if (kc == 0 || at % kBlock == 0) tables[r] = dec.table(block_absmax(w, at / kBlock));
              _mm512_storeu_si512(rows.data() + r * kGroup, dec.decode(w.packed + at / 2, tables[r]));
            }
          const uint16_t* a = per_group ? rows.data() : rows.data() + kc * kGroup;
          const int64_t stride = per_group ? kGroup : K;
          const uint16_t* b = xt + (mt * groups + kc) * kTileWords;
          pair == 2 ? amx_group<2>(a, stride, b, groups * kTileWords) : amx_group<1>(a, stride, b, 0);
        }
        _tile_stored(0, sums[0], 64); _tile_stored(1, sums[1], 64);
        _tile_stored(2, sums[2], 64); _tile_stored(3, sums[3], 64);
        const int64_t tokens = std::min<int64_t>(2 * kTile, M - mt * kTile);
        for (int64_t t = 0; t < tokens; ++t)
          for (int64_t r = 0; r < count; ++r)
            y[(mt * kTile + t) * N + o + r] = sums[r / kTile + 2 * (t / kTile)][(r % kTile) * kTile + t % kTile];
      }
    }
    _tile_release();
  });
}
#endif

// y [M, N] (stride N, from row o's column) = R decoded rows (stride K) times all M tokens, in token tiles.
template <int R, class W>
static void rows_times_tokens(const W* w, const float* x, int64_t M, int64_t K, float* y, int64_t N) {
  int64_t t = 0;
  constexpr int T = kTokenTile<W>;
  for (; t + T <= M; t += T) dot_tile<R, T>(w, x + t * K, K, y + t * N, N);
  if (M > t) dispatch<T - 1>(M - t, [&](auto rest) { dot_tile<R, rest.value>(w, x + t * K, K, y + t * N, N); });
}

// One weight of a fused loop's group and the output it writes, y [M, N].
struct Target {
  Nf4 w;
  float* y;
};

// The fused loop: y_i [M, N_i] = x [M, K] (lane order) times weight i for every weight of `group` (all [N_i, K]),
// threads over the tiles of rows of all of them, weight after weight: one pass of the threads for the group (the
// q, k and v projections of a layer, say). Up to direct_max_tokens tokens each group of weights is decoded into
// registers and used at once; above, each tile of rows is decoded into L1 and reused by every token. Both sum each
// (row, token) product over k in the same order, so a token's result depends neither on its batch nor on the
// group its weight is in.
// `after(i, o0, o1)` is called on the thread that computed them, once rows [o0, o1) of weight i have their values in
// y_i for every token (each thread's share: a range of tiles), so that it can add to them while they are in its cache.
template <bool BF16, class After>
static void fused_loop(const std::vector<Target>& group, const float* x, int64_t M, int64_t direct_max_tokens,
                       const After& after) {
  const int64_t K = group.front().w.K;
  std::vector<int64_t> first_tile{0};  // weight i's tiles: [first_tile[i], first_tile[i + 1])
  std::vector<Decoder> decoders;
  for (const Target& target : group) {
    first_tile.push_back(first_tile.back() + (target.w.N + kRowTile - 1) / kRowTile);
    decoders.emplace_back(target.w.code);
  }
  at::parallel_for(0, first_tile.back(), 8, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(M > direct_max_tokens ? kRowTile * K : 0);
    size_t i = std::upper_bound(first_tile.begin(), first_tile.end(), begin) - first_tile.begin() - 1;
    for (int64_t tile = begin; tile < end; ++tile) {
      while (tile >= first_tile[i + 1]) ++i;
      const Nf4& w = group[i].w;
      const Decoder& dec = decoders[i];
      float* y = group[i].y;
      const int64_t o = (tile - first_tile[i]) * kRowTile, count = std::min<int64_t>(kRowTile, w.N - o);
      if (M <= direct_max_tokens) {
        dispatch<kRowTile>(count, [&](auto R) {
          dispatch<4>(M, [&](auto T) { direct_tile<R.value, T.value, BF16>(w, dec, o, x, y); });
        });
        continue;
      }
      for (int64_t r = 0; r < count; ++r) decode_range<BF16, false>(w, dec, o + r, 0, K, rows.data() + r * K);
      dispatch<kRowTile>(count, [&](auto R) { rows_times_tokens<R.value>(rows.data(), x, M, K, y + o, w.N); });
    }
    for (size_t j = 0; j < group.size(); ++j) {
      const int64_t lo = std::max(begin, first_tile[j]), hi = std::min(end, first_tile[j + 1]);
      if (lo < hi)
        after(j, (lo - first_tile[j]) * kRowTile, std::min((hi - first_tile[j]) * kRowTile, group[j].w.N));
    }
  });
}

template <bool BF16>
static void fused_loop(const std::vector<Target>& group, const float* x, int64_t M, int64_t direct_max_tokens) {
  fused_loop<BF16>(group, x, M, direct_max_tokens, [](size_t, int64_t, int64_t) {});
}

// The whole weight into dst [N, K] in natural order, threads over rows.
template <bool BF16>
static void dequant_all(const Nf4& w, float* dst) {
  const Decoder dec(w.code);
  at::parallel_for(0, w.N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) decode_range<BF16, true>(w, dec, o, 0, w.K, dst + o * w.K);
  });
}

// The whole weight into dst [N, K] as bfloat16 (its bits: the values are bf16-rounded, so truncating is exact).
static void dequant_all_bf16(const Nf4& w, uint16_t* dst) {
  const Decoder dec(w.code);
  at::parallel_for(0, w.N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(w.K);
    for (int64_t o = begin; o < end; ++o) {
      decode_range<true, true>(w, dec, o, 0, w.K, row.data());
      uint16_t* out = dst + o * w.K;
      for (int64_t k = 0; k < w.K; ++k) {
        uint32_t u; std::memcpy(&u, &row[k], 4);
        out[k] = static_cast<uint16_t>(u >> 16);
      }
    }
  });
}

static Nf4 describe(torch::Tensor packed, torch::Tensor qabsmax, torch::Tensor absmax2, torch::Tensor code2,
                    torch::Tensor code, double offset, int64_t blocksize2, int64_t N, int64_t K) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && qabsmax.scalar_type() == at::kByte, "uint8 packed data and absmax");
  TORCH_CHECK(absmax2.scalar_type() == at::kFloat && code2.scalar_type() == at::kFloat &&
              code.scalar_type() == at::kFloat, "float32 quantization state");
  TORCH_CHECK(packed.is_contiguous() && qabsmax.is_contiguous() && absmax2.is_contiguous() && code.is_contiguous(),
              "contiguous state");
  TORCH_CHECK(K % kGroup == 0 && packed.numel() * 2 == N * K && code.numel() == 16,
              "NF4 weight of [N, K], K % 32 == 0");
  TORCH_CHECK(blocksize2 > 0 && (blocksize2 & (blocksize2 - 1)) == 0, "nested blocksize must be a power of two");
  return Nf4{packed.data_ptr<uint8_t>(), qabsmax.data_ptr<uint8_t>(), absmax2.data_ptr<float>(),
             code2.data_ptr<float>(), code.data_ptr<float>(), static_cast<float>(offset),
             __builtin_ctzll(static_cast<uint64_t>(blocksize2)), N, K};
}

// The whole weight dequantized, [N, K] float32 (bfloat16-rounded values when bf16).
torch::Tensor nf4_dequantize(torch::Tensor packed, torch::Tensor qabsmax, torch::Tensor absmax2, torch::Tensor code2,
                             torch::Tensor code, double offset, int64_t blocksize2, int64_t N, int64_t K, bool bf16) {
  const Nf4 w = describe(packed, qabsmax, absmax2, code2, code, offset, blocksize2, N, K);
  torch::Tensor out = torch::empty({N, K}, torch::kFloat);
  bf16 ? dequant_all<true>(w, out.data_ptr<float>()) : dequant_all<false>(w, out.data_ptr<float>());
  return out;
}

// y = x @ dequant(W).T (+ bias): x [M, K] in the compute dtype (float32 or bfloat16), y [M, N] likewise.
// Up to direct_max_tokens tokens the weights are decoded into registers and used at once; up to
// blas_min_tokens - 1 each tile of rows is decoded into L1 and reused by every token; from
// blas_min_tokens on the whole weight is decoded into a reused buffer and multiplied by BLAS.
torch::Tensor nf4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor qabsmax, torch::Tensor absmax2,
                         torch::Tensor code2, torch::Tensor code, double offset, int64_t blocksize2, int64_t N,
                         c10::optional<torch::Tensor> bias, int64_t direct_max_tokens, int64_t blas_min_tokens) {
  TORCH_CHECK(x.dim() == 2, "x must be [tokens, in_features]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float32 or bfloat16 activations");
  TORCH_CHECK(direct_max_tokens <= 4, "direct_max_tokens is at most 4");
  const bool bf16 = dtype == at::kBFloat16;
  const int64_t M = x.size(0), K = x.size(1);
  const Nf4 w = describe(packed, qabsmax, absmax2, code2, code, offset, blocksize2, N, K);
  if (M >= blas_min_tokens && bf16 && kHasAvx512Bf16) {  // bf16 BLAS (oneDNN: AMX or AVX512-BF16), float32 sums
    static thread_local torch::Tensor scratch;
    if (!scratch.defined() || scratch.numel() < N * K) scratch = torch::empty({N * K}, torch::kBFloat16);
    dequant_all_bf16(w, reinterpret_cast<uint16_t*>(scratch.data_ptr<at::BFloat16>()));
    const torch::Tensor weight = scratch.narrow(0, 0, N * K).view({N, K});
    const torch::Tensor xb = x.contiguous();
    return bias.has_value() ? at::addmm(bias->to(torch::kBFloat16), xb, weight.t()) : at::mm(xb, weight.t());
  }
  const torch::Tensor xf = x.to(torch::kFloat).contiguous();
  torch::Tensor y;
  if (M >= blas_min_tokens) {
    static thread_local torch::Tensor scratch;
    if (!scratch.defined() || scratch.numel() < N * K) scratch = torch::empty({N * K}, torch::kFloat);
    bf16 ? dequant_all<true>(w, scratch.data_ptr<float>()) : dequant_all<false>(w, scratch.data_ptr<float>());
    const torch::Tensor weight = scratch.narrow(0, 0, N * K).view({N, K});
    y = bias.has_value() ? at::addmm(bias->to(torch::kFloat), xf, weight.t()) : at::mm(xf, weight.t());
  } else {
    y = torch::empty({M, N}, torch::kFloat);
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (bf16 && amx_permitted()) {
      const torch::Tensor xt = to_amx_tiles(x.contiguous());
      amx_loop(w, reinterpret_cast<const uint16_t*>(xt.data_ptr<at::BFloat16>()), M, y.data_ptr<float>());
    } else
#endif
    {
      const torch::Tensor xl = to_lane_order(xf);
      const std::vector<Target> group{{w, y.data_ptr<float>()}};
      bf16 ? fused_loop<true>(group, xl.data_ptr<float>(), M, direct_max_tokens)
           : fused_loop<false>(group, xl.data_ptr<float>(), M, direct_max_tokens);
    }
    if (bias.has_value()) y.add_(bias->to(torch::kFloat));
  }
  return dtype == at::kFloat ? y : y.to(dtype);
}

// Weights that read the same x [M, K] (a layer's q, k and v; gate and up), described once so that a call passes x
// alone: [x @ dequant(W_i).T for each weight i] for float32 x below the BLAS threshold, by the fused loop over all the
// weights at once (x put in lane order once), each y_i bit-identical to nf4_linear's for weight i alone.
class Nf4Group {
 public:
  // lora_a, lora_b, lora_scale: each weight's LoRA slot buffers (float32 A [slots, R, K], B [slots, R, N_i], the
  // transposed LoRA B, scale [slots]), read in place by `linear_lora`; biases: each weight's bias [N_i] or None.
  // Both may be empty (no `linear_lora`).
  Nf4Group(std::vector<torch::Tensor> packed, std::vector<torch::Tensor> qabsmax, std::vector<torch::Tensor> absmax2,
           std::vector<torch::Tensor> code2, std::vector<torch::Tensor> code, std::vector<double> offset,
           std::vector<int64_t> blocksize2, std::vector<int64_t> N, int64_t K, std::vector<torch::Tensor> lora_a,
           std::vector<torch::Tensor> lora_b, std::vector<torch::Tensor> lora_scale,
           std::vector<c10::optional<torch::Tensor>> biases) {
    const size_t count = packed.size();
    TORCH_CHECK(count > 0 && qabsmax.size() == count && absmax2.size() == count && code2.size() == count &&
                code.size() == count && offset.size() == count && blocksize2.size() == count && N.size() == count,
                "one state per weight");
    TORCH_CHECK(lora_a.empty() || (lora_a.size() == count && lora_b.size() == count && lora_scale.size() == count &&
                                   biases.size() == count), "one LoRA slot set and bias per weight, or none");
    for (size_t i = 0; i < count; ++i) {
      weights_.push_back(describe(packed[i], qabsmax[i], absmax2[i], code2[i], code[i], offset[i], blocksize2[i],
                                  N[i], K));
      for (const torch::Tensor& t : {packed[i], qabsmax[i], absmax2[i], code2[i], code[i]}) state_.push_back(t);
      if (lora_a.empty()) continue;
      const torch::Tensor &A = lora_a[i], &B = lora_b[i], &scale = lora_scale[i];
      TORCH_CHECK(A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat &&
                  A.is_contiguous() && B.is_contiguous() && scale.is_contiguous(), "contiguous float32 slot buffers");
      TORCH_CHECK(A.dim() == 3 && A.size(2) == K && B.dim() == 3 && B.size(2) == N[i] && B.size(0) == A.size(0) &&
                  B.size(1) == A.size(1) && A.size(1) == lora_a.front().size(1), "A [slots, R, K], B [slots, R, N]");
      const float* bias = nullptr;
      if (biases[i].has_value()) {
        TORCH_CHECK(biases[i]->scalar_type() == at::kFloat && biases[i]->is_contiguous() &&
                    biases[i]->numel() == N[i], "float32 bias [N]");
        bias = biases[i]->data_ptr<float>();
        state_.push_back(*biases[i]);
      }
      lora_.push_back({A.data_ptr<float>(), B.data_ptr<float>(), scale.data_ptr<float>(), bias});
      for (const torch::Tensor& t : {A, B, scale}) state_.push_back(t);
      max_rank_ = A.size(1);
    }
  }

  std::vector<torch::Tensor> linear(torch::Tensor x, int64_t direct_max_tokens) const {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == weights_.front().K,
                "x must be float32 [tokens, in_features]");
    TORCH_CHECK(direct_max_tokens <= 4, "direct_max_tokens is at most 4");
    std::vector<torch::Tensor> ys;
    const std::vector<Target> group = outputs(x.size(0), ys);
    const torch::Tensor xl = to_lane_order(x.contiguous());
    fused_loop<false>(group, xl.data_ptr<float>(), x.size(0), direct_max_tokens);
    return ys;
  }

  // [x @ dequant(W_i).T (+ bias_i) + lora_i(x)] for each weight i, float32 x [M, K] below the BLAS threshold, where
  // lora_i(x)[t] = (A_i[s, :r] @ x[t] * scale_i[s]) @ B_i[s, :r] for t = tokens[k], s = slots[k], r = ranks[s] (tokens
  // of a slot adjacent, as for lora_bgmv; other tokens get no LoRA term): the bits of `linear`, the bias added, then
  // lora_bgmv. Two passes of the threads: the shrinks over (tile of tokens, weight) items, then the fused loop, each
  // thread adding the bias and the expand to the outputs it has just computed (in its cache, not another core's).
  std::vector<torch::Tensor> linear_lora(torch::Tensor x, int64_t direct_max_tokens, torch::Tensor ranks,
                                         torch::Tensor tokens, torch::Tensor slots) const {
    TORCH_CHECK(!lora_.empty(), "this group was built without LoRA slot buffers");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == weights_.front().K,
                "x must be float32 [tokens, in_features]");
    TORCH_CHECK(direct_max_tokens <= 4, "direct_max_tokens is at most 4");
    TORCH_CHECK(ranks.scalar_type() == at::kLong && tokens.scalar_type() == at::kLong &&
                slots.scalar_type() == at::kLong && tokens.numel() == slots.numel() && ranks.is_contiguous() &&
                tokens.is_contiguous() && slots.is_contiguous(), "int64 ranks, and tokens and slots of one length");
    const int64_t M = x.size(0), K = x.size(1), n = tokens.numel(), weights = static_cast<int64_t>(weights_.size());
    const torch::Tensor xc = x.contiguous();
    const float* xp = xc.data_ptr<float>();
    const int64_t* rp = ranks.data_ptr<int64_t>();
    const int64_t* tp = tokens.data_ptr<int64_t>();
    const int64_t* slp = slots.data_ptr<int64_t>();
    const std::vector<int64_t> starts = slot_tiles(slp, n);
    const int64_t tiles = static_cast<int64_t>(starts.size()) - 1;
    std::vector<float> h(weights * n * max_rank_);  // weight i's h of grouped token k: h[(i * n + k) * max_rank_]
    at::parallel_for(0, tiles * weights, 1, [&](int64_t begin, int64_t end) {
      std::vector<vf> partial(kTile * max_rank_ + kLanes);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t tile = item / weights, i = item % weights, first = starts[tile], s = slp[first];
        const Lora& lora = lora_[i];
        dispatch<kTile>(starts[tile + 1] - first, [&](auto T) {
          const float* xs[decltype(T)::value];
          for (int t = 0; t < T.value; ++t) xs[t] = xp + tp[first + t] * K;
          constexpr int64_t R = kShrinkRows<T.value>;
          Prefetch next_a;  // the next item's rows of A, spread over this shrink's steps
          if (item + 1 < end) {
            const int64_t next_s = slp[starts[(item + 1) / weights]];
            const float* a = lora_[(item + 1) % weights].a + next_s * max_rank_ * K;
            next_a = Prefetch(a, rp[next_s] * K, (rp[s] + R - 1) / R * (K / kLanes));
          }
          shrink<T.value>(lora.a + s * max_rank_ * K, xs, K, rp[s], lora.scale[s], &h[(i * n + first) * max_rank_],
                          max_rank_, partial.data(), next_a);
        });
      }
    });
    std::vector<torch::Tensor> ys;
    const std::vector<Target> group = outputs(M, ys);
    const torch::Tensor xl = to_lane_order(xc);
    fused_loop<false>(group, xl.data_ptr<float>(), M, direct_max_tokens, [&](size_t i, int64_t o0, int64_t o1) {
      const Lora& lora = lora_[i];
      const int64_t N = weights_[i].N;
      float* y = group[i].y;
      if (lora.bias != nullptr)
        for (int64_t t = 0; t < M; ++t)
          for (int64_t o = o0; o < o1; ++o) y[t * N + o] += lora.bias[o];
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t first = starts[tile], s = slp[first];
        dispatch<kTile>(starts[tile + 1] - first, [&](auto T) {
          float* yt[decltype(T)::value];
          for (int t = 0; t < T.value; ++t) yt[t] = y + tp[first + t] * N;
          Prefetch next_b;  // the next tile's rows of B over [o0, o1), spread over this expand's steps
          if (tile + 1 < tiles && slp[starts[tile + 1]] != s) {
            const int64_t next_s = slp[starts[tile + 1]], next_r = rp[next_s];
            constexpr int64_t V = kExpandVecs<T.value>;
            const int64_t chunks = ((o1 - o0) / kLanes + V - 1) / V;
            if (next_r > 0)
              next_b = Prefetch(lora.b + next_s * max_rank_ * N + o0, (next_r - 1) * N + (o1 - o0), rp[s] * chunks);
          }
          expand_range<T.value>(lora.b + s * max_rank_ * N, &h[(i * n + first) * max_rank_], max_rank_, yt, rp[s], N,
                                o0, o1, next_b);
        });
      }
    });
    return ys;
  }

 private:
  // ys: a new float32 [M, N_i] output per weight; returns the fused loop's targets writing them.
  std::vector<Target> outputs(int64_t M, std::vector<torch::Tensor>& ys) const {
    std::vector<Target> group;
    for (const Nf4& w : weights_) {
      ys.push_back(torch::empty({M, w.N}, torch::kFloat));
      group.push_back({w, ys.back().data_ptr<float>()});
    }
    return group;
  }

  struct Lora {  // a weight's LoRA slot buffers and bias (nullptr: none)
    const float* a;
    const float* b;
    const float* scale;
    const float* bias;
  };
  std::vector<Nf4> weights_;
  std::vector<Lora> lora_;
  int64_t max_rank_ = 0;
  std::vector<torch::Tensor> state_;  // the tensors the descriptors point into, kept alive
};

// y [M, N] = x [M, K] @ w.T for a dense w [N, K] (K % kLanes == 0), float32 or bfloat16 (widened exactly,
// so the same values give the same bits either way): the same tiles, rows read in place, so a token's
// result does not depend on its batch here either.
torch::Tensor dense_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) &&
              w.is_contiguous(), "float32 x and contiguous float32 or bfloat16 w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % kLanes == 0, "in_features must be a multiple of the vector width");
  const torch::Tensor xc = x.contiguous();
  torch::Tensor y = torch::empty({M, N}, torch::kFloat);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto run = [&](const auto* wp) {
    at::parallel_for(0, (N + kRowTile - 1) / kRowTile, 64, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t o = tile * kRowTile;
        dispatch<kRowTile>(std::min<int64_t>(kRowTile, N - o), [&](auto R) {
          rows_times_tokens<R.value>(wp + o * K, xp, M, K, yp + o, N);
        });
      }
    });
  };
  if (w.scalar_type() == at::kFloat) run(w.data_ptr<float>());
  else run(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
  return y;
}

// The path bfloat16 activations take below blas_min_tokens here: "amx", or "float32" (bf16-rounded
// weights, float32 products), and above it: bf16 BLAS where the CPU has AVX512-BF16, else float32 BLAS.
std::string bf16_path() {
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (amx_permitted()) return "amx";
#endif
  return kHasAvx512Bf16 ? "avx512_bf16" : "float32";
}

// The kernels run without the GIL: the server's other threads (transports, tokenizers) go on meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("bf16_path", &bf16_path);
  m.def("dense_linear", &dense_linear, no_gil);
  m.def("nf4_linear", &nf4_linear, no_gil);
  py::class_<Nf4Group>(m, "Nf4Group", py::module_local())  // local: each build (CPU path) registers its own
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<double>, std::vector<int64_t>,
                    std::vector<int64_t>, int64_t, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<c10::optional<torch::Tensor>>>())
      .def("linear", &Nf4Group::linear, no_gil)
      .def("linear_lora", &Nf4Group::linear_lora, no_gil);
  m.def("nf4_dequantize", &nf4_dequantize, no_gil);
}
