#include "common/cpu_matmul.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/float8.h"

namespace pollen {
namespace {

// y[r * y_stride + k] = x[r] . w[k] for input rows r < kRows of x
// [kRows, in] and weight rows k < 4 of w [4, in]. The 4 * kRows sums stay
// in registers, so each loaded weight vector feeds kRows multiply-adds and
// the sums need no reduction until the end. The sums, the kRows input
// vectors and one weight vector must fit the vector registers: 16 with
// AVX2 (kRows <= 3), 32 with AVX-512VL (kRows <= 5).
template <int kRows>
__attribute__((always_inline)) inline void MatMulTile(
    const float* __restrict__ x, int64_t in, const float* __restrict__ w,
    float* __restrict__ y, int64_t y_stride) {
  Float8 acc[kRows][4] = {};
  const int64_t whole = in - in % 8;
  for (int64_t i = 0; i < whole; i += 8) {
    Float8 v[kRows];
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) v[r] = Load8(x + r * in + i);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const Float8 wk = Load8(w + k * in + i);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) acc[r][k] += v[r] * wk;
    }
  }

  // The 4 * kRows reductions, eight at a time, as one transposed sum each:
  // with a small `in` they cost as much as the multiply-adds.
  constexpr int kSums = 4 * kRows;
  constexpr int kGroups = (kSums + 7) / 8;
  Float8 flat[8 * kGroups] = {};
  for (int r = 0; r < kRows; ++r) {
    for (int k = 0; k < 4; ++k) flat[4 * r + k] = acc[r][k];
  }
  float sums[8 * kGroups];
  for (int g = 0; g < kGroups; ++g) {
    Store8(TransposedSums(flat + 8 * g), sums + 8 * g);
  }
  for (int r = 0; r < kRows; ++r) {
    const float* row = x + r * in;
    for (int k = 0; k < 4; ++k) {
      float sum = sums[4 * r + k];
      for (int64_t i = whole; i < in; ++i) sum += row[i] * w[k * in + i];
      y[r * y_stride + k] = sum;
    }
  }
}

// y[r, o] = sum_i x[r, i] * w[o, i] for x [rows, in], output features
// o in [begin, end) of w [out, in], and y [rows, y_stride], in tiles of 4
// output features by kTileRows input rows (the last tile of rows may be
// smaller). A tile's 4 weight rows come from memory once, and from the
// cache for the further input rows.
template <int kTileRows>
__attribute__((always_inline)) inline void MatMulTiles(
    const float* __restrict__ x, int64_t rows, int64_t in,
    const float* __restrict__ w, int64_t begin, int64_t end,
    float* __restrict__ y, int64_t y_stride) {
  static_assert(kTileRows == 3 || kTileRows == 4, "3 or 4 rows per tile");
  int64_t o = begin;
  for (; o + 4 <= end; o += 4) {
    const float* w_tile = w + o * in;
    int64_t r = 0;
    for (; r + kTileRows <= rows; r += kTileRows) {
      MatMulTile<kTileRows>(x + r * in, in, w_tile, y + r * y_stride + o,
                            y_stride);
    }
    const int64_t left = rows - r;
    const float* x_left = x + r * in;
    float* y_left = y + r * y_stride + o;
    if (kTileRows > 3 && left == 3) {
      MatMulTile<3>(x_left, in, w_tile, y_left, y_stride);
    } else if (kTileRows > 2 && left == 2) {
      MatMulTile<2>(x_left, in, w_tile, y_left, y_stride);
    } else if (left == 1) {
      MatMulTile<1>(x_left, in, w_tile, y_left, y_stride);
    }
  }
  for (; o < end; ++o) {
    for (int64_t r = 0; r < rows; ++r) {
      y[r * y_stride + o] = Dot(x + r * in, w + o * in, in);
    }
  }
}

// The tiles for CPUs with FMA (and the baseline build): 3 input rows at a
// time fill AVX2's 16 vector registers.
POLLEN_CPU_CLONES
void MatMulLoops(const float* __restrict__ x, int64_t rows, int64_t in,
                 const float* __restrict__ w, int64_t begin, int64_t end,
                 float* __restrict__ y, int64_t y_stride) {
  MatMulTiles<3>(x, rows, in, w, begin, end, y, y_stride);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The same with AVX-512VL, whose 32 vector registers hold the sums of 4
// input rows: each weight vector loaded feeds 4 multiply-adds. The vectors
// stay 256 bits wide.
__attribute__((target("avx2,fma,avx512f,avx512vl")))
void MatMulLoopsAvx512(const float* __restrict__ x, int64_t rows, int64_t in,
                       const float* __restrict__ w, int64_t begin, int64_t end,
                       float* __restrict__ y, int64_t y_stride) {
  MatMulTiles<4>(x, rows, in, w, begin, end, y, y_stride);
}

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("fma");
  return has;
}
#endif

}  // namespace

POLLEN_CPU_CLONES
void RmsNormRows(const float* __restrict__ x, const float* __restrict__ weight,
                 int64_t rows, int64_t width, float epsilon,
                 float* __restrict__ out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    const float variance = Dot(row, row, width) / static_cast<float>(width);
    const float scale = 1.0f / std::sqrt(variance + epsilon);
    float* out_row = out + r * width;
    for (int64_t j = 0; j < width; ++j) out_row[j] = weight[j] * (row[j] * scale);
  }
}

void MatMul(const float* x, int64_t rows, int64_t in, const at::Tensor& w,
            float* y) {
  const int64_t out = w.size(0);
  if (rows <= kLoopMatMulMaxRows) {
    const float* weight = w.data_ptr<float>();
    const int64_t grain =
        std::max<int64_t>(1, kParallelMatMulWork / std::max<int64_t>(rows * in, 1));
    auto loops = &MatMulLoops;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    // One row gains nothing from more registers.
    if (rows > 1 && HasAvx512()) loops = &MatMulLoopsAvx512;
#endif
    at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
      loops(x, rows, in, weight, begin, end, y, out);
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
