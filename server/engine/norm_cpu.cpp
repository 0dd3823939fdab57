// RMSNorm's C++ source: see norm_cpu.py for what it computes and why its sums run in this order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

// torch's ceil(log2(n)) as its sum kernel takes it: 1 for n <= 2.
static inline int64_t ceil_log2(int64_t n) {
  if (n <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(n - 1));
}

static inline vf squared(const float* p) {
  const vf v = loadv(p);
  return v * v;
}

// The sum of x[i] * x[i] over a contiguous row of n floats, added in the order torch's CPU sum of a contiguous
// last dimension adds them (SumKernel.cpp: vectorized_inner_sum -> row_sum -> multi_row_sum): the row's whole
// vectors as a (-1, 4) array, each of the 4 columns summed in a cascade of levels (level_step vectors at a time);
// the columns' leftover vector(s) into column 0, then the columns in order; then the scalar tail from 0, then
// the lanes of the vector sum one by one. Every product is rounded before it is added (-ffp-contract=off).
static float sum_of_squares(const float* x, int64_t n) {
  constexpr int kIlp = 4, kLevels = 4;
  const int64_t vecs = n / kLanes, rows = vecs / kIlp;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(rows) / kLevels);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  vf acc[kLevels][kIlp] = {};
  int64_t i = 0;
  while (i + level_step <= rows) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < kIlp; ++k) acc[0][k] += squared(x + (i * kIlp + k) * kLanes);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k) {
        acc[j][k] += acc[j - 1][k];
        acc[j - 1][k] = vf{};
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i)
    for (int k = 0; k < kIlp; ++k) acc[0][k] += squared(x + (i * kIlp + k) * kLanes);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k) acc[0][k] += acc[j][k];
  vf sum = acc[0][0];
  for (int64_t v = rows * kIlp; v < vecs; ++v) sum += squared(x + v * kLanes);
  for (int k = 1; k < kIlp; ++k) sum += acc[0][k];
  float total = 0.0f;
  for (int64_t e = vecs * kLanes; e < n; ++e) total += x[e] * x[e];
  for (int l = 0; l < kLanes; ++l) total += sum[l];
  return total;
}

// out[t] = weight * (x[t] * (1 / sqrt(mean(x[t]^2) + eps))) for each row t of x [rows, D], each product and sum
// rounded as torch's separate ops round them.
static void normalize_rows(const float* x, const float* weight, float eps, int64_t rows, int64_t D, float* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = x + t * D;
      const float variance = sum_of_squares(row, D) / static_cast<float>(D);
      const float r = 1.0f / std::sqrt(variance + eps);
      float* o = out + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] = weight[d] * (row[d] * r);
    }
  });
}

static void check(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x: contiguous float32 [rows, D]");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.numel() == x.size(1),
              "weight: contiguous float32 [D]");
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check(x, weight);
  auto out = torch::empty_like(x);
  normalize_rows(x.data_ptr<float>(), weight.data_ptr<float>(), static_cast<float>(eps), x.size(0), x.size(1),
                 out.data_ptr<float>());
  return out;
}

// hidden + delta, and its rms_norm: the residual add and the norm after it in one pass over the rows.
std::vector<torch::Tensor> add_rms_norm(torch::Tensor hidden, torch::Tensor delta, torch::Tensor weight, double eps) {
  check(hidden, weight);
  TORCH_CHECK(delta.sizes() == hidden.sizes() && delta.is_contiguous() && delta.scalar_type() == at::kFloat,
              "delta: hidden's shape, contiguous float32");
  auto sum = torch::empty_like(hidden), out = torch::empty_like(hidden);
  const int64_t rows = hidden.size(0), D = hidden.size(1);
  const float *h = hidden.data_ptr<float>(), *d = delta.data_ptr<float>();
  float* s = sum.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * D; i < end * D; ++i) s[i] = h[i] + d[i];
  });
  normalize_rows(s, weight.data_ptr<float>(), static_cast<float>(eps), rows, D, out.data_ptr<float>());
  return {sum, out};
}

// Without the GIL, as torch's own ops: the server's other threads go on meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm", &add_rms_norm, py::call_guard<py::gil_scoped_release>());
}
