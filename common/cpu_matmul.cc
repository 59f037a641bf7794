#include "common/cpu_matmul.h"

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace pollen {
namespace {

// Eight floats in one vector register (AVX) or two (SSE).
typedef float Float8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline Float8 Load8(const float* p) {
  Float8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline float Sum8(Float8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// y[r * y_stride + k] = x[r] . w[k] for input rows r < kRows (1 or 2) of
// x [kRows, in] and weight rows k < 4 of w [4, in]. The 4 * kRows sums stay
// in registers, so each loaded weight vector feeds kRows multiply-adds and
// the sums need no reduction until the end.
template <int kRows>
__attribute__((always_inline)) inline void MatMulTile(
    const float* __restrict__ x, int64_t in, const float* __restrict__ w,
    float* __restrict__ y, int64_t y_stride) {
  static_assert(kRows == 1 || kRows == 2, "tiles have 1 or 2 input rows");
  const float* x1 = kRows == 2 ? x + in : x;
  Float8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  Float8 b0 = {}, b1 = {}, b2 = {}, b3 = {};
  const int64_t whole = in - in % 8;
  for (int64_t i = 0; i < whole; i += 8) {
    const Float8 w0 = Load8(w + i);
    const Float8 w1 = Load8(w + in + i);
    const Float8 w2 = Load8(w + 2 * in + i);
    const Float8 w3 = Load8(w + 3 * in + i);
    const Float8 v0 = Load8(x + i);
    a0 += v0 * w0;
    a1 += v0 * w1;
    a2 += v0 * w2;
    a3 += v0 * w3;
    if (kRows == 2) {
      const Float8 v1 = Load8(x1 + i);
      b0 += v1 * w0;
      b1 += v1 * w1;
      b2 += v1 * w2;
      b3 += v1 * w3;
    }
  }
  float sums[2][4] = {{Sum8(a0), Sum8(a1), Sum8(a2), Sum8(a3)},
                      {Sum8(b0), Sum8(b1), Sum8(b2), Sum8(b3)}};
  for (int r = 0; r < kRows; ++r) {
    const float* row = r == 0 ? x : x1;
    for (int k = 0; k < 4; ++k) {
      for (int64_t i = whole; i < in; ++i) sums[r][k] += row[i] * w[k * in + i];
      y[r * y_stride + k] = sums[r][k];
    }
  }
}

// y[r, o] = sum_i x[r, i] * w[o, i] for x [rows, in], output features
// o in [begin, end) of w [out, in], and y [rows, y_stride], in tiles of 4
// output features by 2 input rows. A tile's 4 weight rows come from memory
// once, and from the cache for the further input rows.
POLLEN_CPU_CLONES
void MatMulLoops(const float* __restrict__ x, int64_t rows, int64_t in,
                 const float* __restrict__ w, int64_t begin, int64_t end,
                 float* __restrict__ y, int64_t y_stride) {
  int64_t o = begin;
  for (; o + 4 <= end; o += 4) {
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) {
      MatMulTile<2>(x + r * in, in, w + o * in, y + r * y_stride + o, y_stride);
    }
    if (r < rows) {
      MatMulTile<1>(x + r * in, in, w + o * in, y + r * y_stride + o, y_stride);
    }
  }
  for (; o < end; ++o) {
    for (int64_t r = 0; r < rows; ++r) {
      y[r * y_stride + o] = Dot(x + r * in, w + o * in, in);
    }
  }
}

}  // namespace

void MatMul(const float* x, int64_t rows, int64_t in, const at::Tensor& w,
            float* y) {
  const int64_t out = w.size(0);
  if (rows <= kLoopMatMulMaxRows) {
    const float* weight = w.data_ptr<float>();
    const int64_t grain =
        std::max<int64_t>(1, kParallelMatMulWork / std::max<int64_t>(rows * in, 1));
    at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
      MatMulLoops(x, rows, in, weight, begin, end, y, out);
    });
    return;
  }
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor result = at::from_blob(y, {rows, out}, options);
  at::mm_out(result, at::from_blob(const_cast<float*>(x), {rows, in}, options),
             w.t());
}

at::Tensor LinearFewRows(const at::Tensor& x, const at::Tensor& w) {
  const bool float_cpu = x.scalar_type() == at::kFloat &&
                         w.scalar_type() == at::kFloat && x.is_cpu() &&
                         w.is_cpu() && x.dim() >= 1;
  const int64_t in = x.dim() >= 1 ? x.size(-1) : 0;
  const int64_t rows = in > 0 ? x.numel() / in : 0;
  if (!float_cpu || rows == 0 || rows > kLoopMatMulMaxRows ||
      w.dim() != 2 || w.size(1) != in) {
    return at::linear(x, w);
  }
  const at::Tensor input = x.contiguous();
  const at::Tensor weight = w.contiguous();
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = weight.size(0);
  at::Tensor output = at::empty(sizes, x.options());
  MatMul(input.data_ptr<float>(), rows, in, weight, output.data_ptr<float>());
  return output;
}

}  // namespace pollen
