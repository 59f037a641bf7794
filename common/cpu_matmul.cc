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

// Sixteen floats: one AVX-512 register.
typedef float Float16 __attribute__((vector_size(64)));

// y[r * y_stride + o + j] = sum_i x[r, i] * wt[i, o + j] for kRows input
// rows of x [kRows, in], j < min(valid, kVectors * lanes), with wt [in,
// stride] a transposed weight. Each weight vector loaded feeds kRows
// multiply-adds by a broadcast input value, and the sums leave the
// registers as they are: no reduction at all.
template <typename Vector, int kRows, int kVectors>
__attribute__((always_inline)) inline void TransposedTile(
    const float* __restrict__ x, int64_t in, const float* __restrict__ wt,
    int64_t stride, int64_t o, int64_t valid, float* __restrict__ y,
    int64_t y_stride) {
  constexpr int kLanes = sizeof(Vector) / sizeof(float);
  Vector acc[kRows][kVectors] = {};
  for (int64_t i = 0; i < in; ++i) {
    const float* w_row = wt + i * stride + o;
    Vector w[kVectors];
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      __builtin_memcpy(&w[v], w_row + v * kLanes, sizeof(Vector));
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const float value = x[r * in + i];
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) acc[r][v] += value * w[v];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float* y_row = y + r * y_stride + o;
    if (valid >= kVectors * kLanes) {
      __builtin_memcpy(y_row, acc[r], sizeof(acc[r]));
    } else {
      float sums[kVectors * kLanes];
      __builtin_memcpy(sums, acc[r], sizeof(sums));
      for (int64_t j = 0; j < valid; ++j) y_row[j] = sums[j];
    }
  }
}

// Output columns [begin, end) of y [rows, y_stride] = x wt for x [rows,
// in] and wt [in, stride], where begin is a multiple of kVectors * lanes.
// Tiles of kTileRows rows read each weight vector once per tile. The last
// few rows take a tile of their own size. A lone row takes wider tiles,
// which read longer runs of each weight row.
template <typename Vector, int kTileRows, int kVectors>
__attribute__((always_inline)) inline void TransposedTiles(
    const float* __restrict__ x, int64_t rows, int64_t in,
    const float* __restrict__ wt, int64_t stride, int64_t begin, int64_t end,
    float* __restrict__ y, int64_t y_stride) {
  constexpr int64_t kWidth = kVectors * sizeof(Vector) / sizeof(float);
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows) {
    for (int64_t o = begin; o < end; o += kWidth) {
      TransposedTile<Vector, kTileRows, kVectors>(
          x + r * in, in, wt, stride, o, std::min(end - o, kWidth),
          y + r * y_stride, y_stride);
    }
  }
  const int64_t left = rows - r;
  const float* x_left = x + r * in;
  float* y_left = y + r * y_stride;
  for (int64_t o = begin; o < end; o += kWidth) {
    const int64_t valid = std::min(end - o, kWidth);
    switch (left) {
#define POLLEN_LEFT_ROWS(n)                                                 \
  case n:                                                                   \
    if constexpr (n < kTileRows) {                                          \
      TransposedTile<Vector, n, kVectors>(x_left, in, wt, stride, o, valid, \
                                          y_left, y_stride);                \
    }                                                                       \
    break;
      POLLEN_LEFT_ROWS(2)
      POLLEN_LEFT_ROWS(3)
      POLLEN_LEFT_ROWS(4)
      POLLEN_LEFT_ROWS(5)
      POLLEN_LEFT_ROWS(6)
      POLLEN_LEFT_ROWS(7)
#undef POLLEN_LEFT_ROWS
      default:
        break;
    }
  }
  if (left == 1) {
    int64_t o = begin;
    for (; o + 4 * kWidth <= end; o += 4 * kWidth) {
      TransposedTile<Vector, 1, 4 * kVectors>(x_left, in, wt, stride, o,
                                              4 * kWidth, y_left, y_stride);
    }
    for (; o < end; o += kWidth) {
      TransposedTile<Vector, 1, kVectors>(x_left, in, wt, stride, o,
                                          std::min(end - o, kWidth), y_left,
                                          y_stride);
    }
  }
}

// With FMA (256-bit AVX) and the baseline: 4 rows by 2 Float8 vectors of
// sums, within AVX2's 16 registers.
POLLEN_CPU_CLONES
void TransposedLoops(const float* __restrict__ x, int64_t rows, int64_t in,
                     const float* __restrict__ wt, int64_t stride,
                     int64_t begin, int64_t end, float* __restrict__ y,
                     int64_t y_stride) {
  TransposedTiles<Float8, 4, 2>(x, rows, in, wt, stride, begin, end, y,
                                y_stride);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// With AVX-512: 8 rows by 2 vectors of 16 sums in its 32 registers.
__attribute__((target("avx2,fma,avx512f,avx512vl")))
void TransposedLoopsAvx512(const float* __restrict__ x, int64_t rows,
                           int64_t in, const float* __restrict__ wt,
                           int64_t stride, int64_t begin, int64_t end,
                           float* __restrict__ y, int64_t y_stride) {
  TransposedTiles<Float16, 8, 2>(x, rows, in, wt, stride, begin, end, y,
                                 y_stride);
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

namespace pollen {

TransposedWeight TransposeForMatMul(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_cpu(),
              "a transposed weight needs a 2-D float32 CPU tensor, got ",
              w.sizes(), " of ", w.scalar_type(), " on ", w.device());
  TransposedWeight transposed;
  transposed.out = w.size(0);
  transposed.in = w.size(1);
  transposed.stride =
      (transposed.out + kTransposedAlignment - 1) / kTransposedAlignment *
      kTransposedAlignment;
  transposed.data = at::zeros({transposed.in, transposed.stride}, w.options());
  transposed.data.narrow(1, 0, transposed.out).copy_(w.t());
  return transposed;
}

void MatMulTransposed(const float* x, int64_t rows,
                      const TransposedWeight& wt, float* y) {
  const float* weight = wt.data.data_ptr<float>();
  const int64_t in = wt.in;
  const int64_t out = wt.out;
  const int64_t stride = wt.stride;
  auto loops = &TransposedLoops;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (HasAvx512()) loops = &TransposedLoopsAvx512;
#endif
  // Threads take whole tiles: the grain and each range start at a
  // multiple of the alignment.
  const int64_t tiles = stride / kTransposedAlignment;
  const int64_t grain = std::max<int64_t>(
      1, kParallelMatMulWork /
             std::max<int64_t>(rows * in * kTransposedAlignment, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    loops(x, rows, in, weight, stride, begin * kTransposedAlignment,
          std::min(end * kTransposedAlignment, out), y, out);
  });
}

}  // namespace pollen
