// Decode attention over the paged KV cache, read in place: see attention_cpu.py for what it computes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

constexpr int kMaxGroup = 16;  // query heads sharing one kv head that one pass handles (GQA group size)

// 16 floats (one AVX-512 register, two AVX2 ones): explicit, because float sums are not reassociated
// (vectorized) by the compiler on its own.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));

#if defined(__clang__)
#define LORAPLEX_SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define LORAPLEX_SHUFFLE(v, ...) __builtin_shuffle(v, v16i{__VA_ARGS__})
#endif

// The 16 lanes' sum as a tree (lanes i and i + 8, then + 4, + 2, + 1): four dependent adds, not sixteen; a
// decode step sums one per (context row, query head), so the chain's latency was most of the kernel's time.
static inline float hsum(v16 v) {
  v += LORAPLEX_SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += LORAPLEX_SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += LORAPLEX_SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += LORAPLEX_SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}
#undef LORAPLEX_SHUFFLE

static inline float dot(const float* a, const float* b, int64_t D) {
  v16 acc = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) acc += *reinterpret_cast<const v16*>(a + d) * *reinterpret_cast<const v16*>(b + d);
  float sum = hsum(acc);
  for (; d < D; ++d) sum += a[d] * b[d];
  return sum;
}

// e^x for x <= 0 (scores minus their maximum), 16 at a time: x = n ln2 + r with r in [0, ln2), e^r by
// its degree-7 Taylor polynomial (relative error < 3e-7 there), times 2^n through the exponent bits;
// below -87 the result is 0 (as e^x is, next to the maximum's 1).
static inline v16 exp_nonpositive(v16 x) {
  const v16 t = x * 1.44269504088896341f;       // x / ln 2
  v16i n = __builtin_convertvector(t, v16i);     // truncated toward 0 ...
  n += __builtin_convertvector(n, v16) > t;  // ... floored (t <= 0): a true lane compares as -1
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;  // ln 2 in two parts
  v16 p = v16{} + 1.0f / 5040;
  p = p * r + 1.0f / 720; p = p * r + 1.0f / 120; p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6; p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
  const v16i low = v16i{} - 126;
  const v16i bits = reinterpret_cast<v16i>(p) + ((n < low ? low : n) << 23);
  return x < -87.0f ? v16{} : reinterpret_cast<v16>(bits);
}

// s[0..count) = e^(s - top), returning their sum (in lane order, then the tail).
static inline float exp_shifted(float* s, int64_t count, float top) {
  v16 total = {};
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    v16* chunk = reinterpret_cast<v16*>(s + j);
    *chunk = exp_nonpositive(*chunk - top);
    total += *chunk;
  }
  float sum = 0;
  for (int i = 0; i < 16; ++i) sum += total[i];
  if (j < count) {
    v16 tail = {};
    for (int64_t i = j; i < count; ++i) tail[i - j] = s[i] - top;
    tail = exp_nonpositive(tail);
    for (int64_t i = j; i < count; ++i) sum += (s[i] = tail[i - j]);
  }
  return sum;
}

// The D values at p as float32: p itself, or widened into buffer.
static inline const float* widen(const float* p, float*, int64_t) { return p; }
static inline const float* widen(const at::BFloat16* p, float* buffer, int64_t D) {
  for (int64_t d = 0; d < D; ++d) buffer[d] = static_cast<float>(p[d]);
  return buffer;
}

// out[query_index[g], h] = softmax_j(q[query_index[g], h] . k[row_j] * scale) . v[row_j] over the visible
// context rows of sequence g (the first `lengths[g]`, the last `window` of them when window > 0), for the
// query heads h of kv head c; every (sequence, kv head) is computed alone, in the same order.
template <typename T>
static void attend(const T* q, const T* keys, const T* values, const int64_t* query_index, const int64_t* rows,
                   const int64_t* lengths, int64_t context, int64_t window, int64_t num_seqs, int64_t heads,
                   int64_t kv_heads, int64_t D, T* out) {
  const int64_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * context), query(group * D), acc(group * D), row(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / kv_heads, c = item % kv_heads, length = lengths[g];
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0, count = length - first;
      const T* qg = q + (query_index[g] * heads + c * group) * D;  // [group, D]
      for (int64_t i = 0; i < group * D; ++i) query[i] = static_cast<float>(qg[i]);
      for (int64_t j = 0; j < count; ++j) {
        const float* k = widen(keys + (rows[g * context + first + j] * kv_heads + c) * D, row.data(), D);
        for (int64_t h = 0; h < group; ++h) scores[h * context + j] = dot(query.data() + h * D, k, D) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float total[kMaxGroup];
      for (int64_t h = 0; h < group; ++h) {
        float* s = scores.data() + h * context;
        const float top = *std::max_element(s, s + count);
        total[h] = exp_shifted(s, count, top);
      }
      for (int64_t j = 0; j < count; ++j) {
        const float* v = widen(values + (rows[g * context + first + j] * kv_heads + c) * D, row.data(), D);
        for (int64_t h = 0; h < group; ++h) {
          const float w = scores[h * context + j];
          float* a = acc.data() + h * D;
          for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
        }
      }
      T* o = out + (query_index[g] * heads + c * group) * D;
      for (int64_t h = 0; h < group; ++h)
        for (int64_t d = 0; d < D; ++d) o[h * D + d] = static_cast<T>(acc[h * D + d] / total[h]);
    }
  });
}

// out [tokens, heads, D] (written at the decode rows only), q likewise; keys/values [rows, kv_heads, D];
// query_index [G]; context_rows [G, K] (padding repeats a valid row); lengths [G] (1..K).
void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor keys, torch::Tensor values,
                      torch::Tensor query_index, torch::Tensor context_rows, torch::Tensor lengths, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && out.sizes() == q.sizes() && keys.sizes() == values.sizes(),
              "q/out [tokens, heads, D], keys/values [rows, kv_heads, D]");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && q.scalar_type() == values.scalar_type() &&
              q.scalar_type() == out.scalar_type(), "one dtype");
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && values.is_contiguous() && out.is_contiguous(),
              "contiguous tensors");
  TORCH_CHECK(query_index.scalar_type() == at::kLong && context_rows.scalar_type() == at::kLong &&
              lengths.scalar_type() == at::kLong && context_rows.is_contiguous(), "int64 indices");
  const int64_t heads = q.size(1), kv_heads = keys.size(1), D = q.size(2);
  TORCH_CHECK(keys.size(2) == D && heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup, "GQA shapes");
  const int64_t num_seqs = context_rows.size(0), context = context_rows.size(1);
  const torch::Tensor qi = query_index.contiguous(), len = lengths.contiguous();
#define LORAPLEX_ATTEND(T)                                                                                  \
  attend<T>(q.data_ptr<T>(), keys.data_ptr<T>(), values.data_ptr<T>(), qi.data_ptr<int64_t>(),           \
            context_rows.data_ptr<int64_t>(), len.data_ptr<int64_t>(), context, window, num_seqs, heads,   \
            kv_heads, D, out.data_ptr<T>())
  if (q.scalar_type() == at::kFloat) LORAPLEX_ATTEND(float);
  else if (q.scalar_type() == at::kBFloat16) LORAPLEX_ATTEND(at::BFloat16);
  else TORCH_CHECK(false, "float32 or bfloat16");
#undef LORAPLEX_ATTEND
}

// Without the GIL, as torch's own ops: the server's other threads go on meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, py::call_guard<py::gil_scoped_release>());
}
