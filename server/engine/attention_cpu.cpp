// The attention step's CPU kernels: rotary embedding with the cache write, and decode attention over the paged KV
// cache read in place. See attention_cpu.py for what they compute.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

constexpr int kMaxGroup = 16;  // query heads sharing one kv head that one pass handles (GQA group size)

typedef int32_t vi __attribute__((vector_size(kLanes * 4), aligned(4)));  // vf's lanes as integers
// Accumulators one pass of the value sums keeps in registers (half of them: the rest hold loads).
constexpr int kAccVecs = kRegisters / 2;

// e^x for x <= 0 (scores minus their maximum), kLanes at a time: x = n ln2 + r with r in [0, ln2), e^r by
// its degree-7 Taylor polynomial (relative error < 3e-7 there), times 2^n through the exponent bits;
// below -87 the result is 0 (as e^x is, next to the maximum's 1).
static inline vf exp_nonpositive(vf x) {
  const vf t = x * 1.44269504088896341f;  // x / ln 2
  vi n = __builtin_convertvector(t, vi);  // truncated toward 0 ...
  n += __builtin_convertvector(n, vf) > t;  // ... floored (t <= 0): a true lane compares as -1
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;  // ln 2 in two parts
  vf p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720; p = p * r + 1.0f / 120; p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6; p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
  const vi low = vi{} - 126;
  const vi bits = reinterpret_cast<vi>(p) + ((n < low ? low : n) << 23);
  return x < -87.0f ? vf{} : reinterpret_cast<vf>(bits);
}

// s[0..count) = e^(s - top), returning their sum (in lane order, then the tail).
static inline float exp_shifted(float* s, int64_t count, float top) {
  vf total = {};
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    const vf e = exp_nonpositive(loadv(s + j) - top);
    storev(s + j, e);
    total += e;
  }
  float sum = 0;
  for (int i = 0; i < kLanes; ++i) sum += total[i];
  if (j < count) {
    vf tail = {};
    for (int64_t i = j; i < count; ++i) tail[i - j] = s[i] - top;
    tail = exp_nonpositive(tail);
    for (int64_t i = j; i < count; ++i) sum += (s[i] = tail[i - j]);
  }
  return sum;
}

// s[j] = (q . k[j]) * scale for the count rows k[j] (D floats each, D % kLanes == 0): kLanes rows at a time, each
// row's products summed lane-wise over d in order, then across lanes by `sum_lanes`. A partial last block repeats
// its first row (those sums are dropped), so every row's bits depend on that row alone.
static void scores(const float* q, const float* const* k, int64_t count, int64_t D, float scale, float* s) {
  for (int64_t j0 = 0; j0 < count; j0 += kLanes) {
    const float* rows[kLanes];
    for (int r = 0; r < kLanes; ++r) rows[r] = k[j0 + r < count ? j0 + r : j0];
    vf acc[kLanes] = {};
    for (int64_t d = 0; d < D; d += kLanes) {
      const vf qv = loadv(q + d);
      for (int r = 0; r < kLanes; ++r) acc[r] = fmadd(qv, loadv(rows[r] + d), acc[r]);
    }
    float sums[kLanes];
    sum_lanes(acc, sums);
    for (int64_t r = 0; r < std::min<int64_t>(kLanes, count - j0); ++r) s[j0 + r] = sums[r] * scale;
  }
}

// acc[u] = sum_j w[head_u][j] * v[j][offset_u ...] for NV output vectors u of the [group, D] result (vector u0 + u:
// head (u0 + u) / (D / kLanes)), over the count rows in order, kept in registers; then written to out.
template <int NV>
static inline void value_pass(const float* const* v, const float* w, int64_t context, int64_t count, int64_t D,
                              int64_t u0, float* out) {
  const int64_t per_head = D / kLanes;
  const float* weights[NV];
  int64_t offsets[NV];
  for (int u = 0; u < NV; ++u) {
    weights[u] = w + ((u0 + u) / per_head) * context;
    offsets[u] = ((u0 + u) % per_head) * kLanes;
  }
  vf acc[NV] = {};
  for (int64_t j = 0; j < count; ++j)
    for (int u = 0; u < NV; ++u) acc[u] = fmadd(splat(weights[u][j]), loadv(v[j] + offsets[u]), acc[u]);
  for (int u = 0; u < NV; ++u) storev(out + (u0 + u) * kLanes, acc[u]);
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
  constexpr bool kWiden = !std::is_same<T, float>::value;
  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(group * context), query(group * D), acc(group * D);
    std::vector<float> widened(kWiden ? 2 * context * D : 0);  // bfloat16 rows as float32: [2, context, D]
    std::vector<const float*> k(context), v(context);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / kv_heads, c = item % kv_heads, length = lengths[g];
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0, count = length - first;
      const T* qg = q + (query_index[g] * heads + c * group) * D;  // [group, D]
      for (int64_t i = 0; i < group * D; ++i) query[i] = static_cast<float>(qg[i]);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t at = (rows[g * context + first + j] * kv_heads + c) * D;
        k[j] = widen(keys + at, widened.data() + j * D, D);
        v[j] = widen(values + at, widened.data() + (context + j) * D, D);
      }
      float total[kMaxGroup];
      for (int64_t h = 0; h < group; ++h) {
        float* s = weights.data() + h * context;
        scores(query.data() + h * D, k.data(), count, D, scale, s);
        total[h] = exp_shifted(s, count, *std::max_element(s, s + count));
      }
      const int64_t vectors = group * D / kLanes;
      for (int64_t u0 = 0; u0 < vectors; u0 += kAccVecs)
        dispatch<kAccVecs>(std::min<int64_t>(kAccVecs, vectors - u0), [&](auto nv) {
          value_pass<nv.value>(v.data(), weights.data(), context, count, D, u0, acc.data());
        });
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
  TORCH_CHECK(D % 16 == 0, "head_dim must be a multiple of 16");
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

// out[t, h] = x[t, h] * cos[t] + roll(x[t, h], D / 2) * sin[t] for H heads of D values: each product rounded, then
// their sum (built with -ffp-contract=off: the bits of torch's mul, mul and add).
static inline void rotate_row(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = x[d] * cos[d] + x[d + half] * sin[d];
  for (int64_t d = half; d < D; ++d) out[d] = x[d] * cos[d] + x[d - half] * sin[d];
}

// Returns q rotated [T, heads, D]; writes k rotated and v into keys/values [rows, kv_heads, D] at write_rows [T].
// q [T, heads * D], k/v [T, kv_heads * D] (row-contiguous), cos/sin [T, D], all float32.
torch::Tensor rotate_and_store(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                               torch::Tensor keys, torch::Tensor values, torch::Tensor write_rows) {
  TORCH_CHECK(keys.dim() == 3 && keys.sizes() == values.sizes() && keys.is_contiguous() && values.is_contiguous(),
              "keys/values [rows, kv_heads, D], contiguous");
  const int64_t T = q.size(0), kv_heads = keys.size(1), D = keys.size(2), rows = keys.size(0);
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && v.dim() == 2 && k.size(0) == T && v.size(0) == T &&
              q.size(1) % D == 0 && k.size(1) == kv_heads * D && v.size(1) == kv_heads * D && D % 2 == 0,
              "q [T, heads * D], k/v [T, kv_heads * D]");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D, "cos/sin [T, D]");
  for (const torch::Tensor* t : {&q, &k, &v, &cos, &sin, &keys, &values})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "float32 tensors");
  TORCH_CHECK(write_rows.scalar_type() == at::kLong && write_rows.numel() == T, "int64 write_rows [T]");
  const torch::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), cc = cos.contiguous(),
                      sc = sin.contiguous(), wr = write_rows.contiguous();
  const int64_t heads = q.size(1) / D;
  const int64_t* at_rows = wr.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(at_rows[t] >= 0 && at_rows[t] < rows, "write row out of range");
  torch::Tensor out = torch::empty({T, heads, D}, torch::kFloat);
  const float *qp = qc.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  const float *cp = cc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  float *op = out.data_ptr<float>(), *keys_p = keys.data_ptr<float>(), *values_p = values.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) rotate_row(qp + (t * heads + h) * D, cp + t * D, sp + t * D, D,
                                                     op + (t * heads + h) * D);
      for (int64_t h = 0; h < kv_heads; ++h) rotate_row(kp + (t * kv_heads + h) * D, cp + t * D, sp + t * D, D,
                                                        keys_p + (at_rows[t] * kv_heads + h) * D);
      std::copy(vp + t * kv_heads * D, vp + (t + 1) * kv_heads * D, values_p + at_rows[t] * kv_heads * D);
    }
  });
  return out;
}

// Without the GIL, as torch's own ops: the server's other threads go on meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("decode_attention", &decode_attention, no_gil);
  m.def("rotate_and_store", &rotate_and_store, no_gil);
}
