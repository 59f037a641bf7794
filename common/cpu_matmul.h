// Float32 matrix products on the CPU for a few rows at a time, as in
// decode steps: y = x w^T that reads each weight once. Also RMSNorm, which
// precedes them in Llama's blocks and head.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

// The loops below are compiled twice on x86-64 with GCC: with FMA (which
// implies 256-bit AVX) and for the baseline instruction set. The dynamic
// loader picks the clone by the CPU's features ("arch=" clones would match
// the CPU model instead).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define POLLEN_CPU_CLONES __attribute__((target_clones("fma", "default")))
#else
#define POLLEN_CPU_CLONES
#endif

namespace pollen {

// Matrix products of up to this many rows run in MatMul's tiled loops,
// which read each weight once, like a matrix-vector product. Larger ones go to
// libtorch's BLAS matrix product. Measured on the 2-core EPYC this was
// written on: with one row and a 2560 x 2048 float32 weight, OpenBLAS
// 0.3.21 (Debian 12) takes about 4 ms of CPU time in sgemm and 0.5 ms in
// sgemv. The tiled loops take 0.5 ms, and with 8 rows 1.5 ms against 4 ms.
inline constexpr int64_t kLoopMatMulMaxRows = 16;

// The loops split the output features over threads above this many
// multiply-adds per thread.
inline constexpr int64_t kParallelMatMulWork = int64_t{1} << 20;

// Sum of a[i] * b[i] with eight partial sums, which the compiler keeps in
// one vector register.
__attribute__((always_inline)) inline float Dot(const float* a, const float* b,
                                                int64_t n) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t whole = n - n % 8;
  for (int64_t i = 0; i < whole; i += 8) {
    for (int j = 0; j < 8; ++j) partial[j] += a[i + j] * b[i + j];
  }
  float sum = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
              ((partial[4] + partial[5]) + (partial[6] + partial[7]));
  for (int64_t i = whole; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Writes out[r] = x[r] / rms(x[r]) * weight for each of `rows` rows of
// `width` floats, where rms(v) = sqrt(mean(v^2) + epsilon).
void RmsNormRows(const float* x, const float* weight, int64_t rows,
                 int64_t width, float epsilon, float* out);

// Writes y = x w^T for x [rows, in] and a contiguous float32 CPU weight w
// [out, in] into y [rows, out]. Up to kLoopMatMulMaxRows rows run in
// tiled loops on libtorch's intra-op threads; more go to libtorch's matrix
// product.
void MatMul(const float* x, int64_t rows, int64_t in, const at::Tensor& w,
            float* y);

// A weight w [out, in] stored transposed for MatMulTransposed: `data` is
// [in, stride], with w's rows as its columns and zeros after column `out`.
// stride is `out` rounded up to kTransposedAlignment floats.
struct TransposedWeight {
  at::Tensor data;
  int64_t in = 0;
  int64_t out = 0;
  int64_t stride = 0;
};

// Column alignment of a TransposedWeight, in floats: two AVX-512 vectors.
inline constexpr int64_t kTransposedAlignment = 32;

// Returns w [out, in], a 2-D float32 CPU tensor, transposed for
// MatMulTransposed. Throws c10::Error for other tensors.
TransposedWeight TransposeForMatMul(const at::Tensor& w);

// Writes y = x w^T into y [rows, out] for x [rows, wt.in], like MatMul,
// from the transposed copy of w. Every product is a multiply-add of a
// broadcast input value and a vector of weights, so no sum needs a
// reduction across vector lanes. MatMul needs one per sum, and with a
// small `in`, as in small models, those cost as much as its multiply-adds.
// The sums
// add in a different order than MatMul's, so results differ by rounding.
// Meant for up to kLoopMatMulMaxRows rows; any number works.
void MatMulTransposed(const float* x, int64_t rows, const TransposedWeight& wt,
                      float* y);

// Returns at::linear(x, w) (no bias), computing it with MatMul when x and w
// are float32 CPU tensors and x has at most kLoopMatMulMaxRows rows (the
// product of all dimensions but the last), and with at::linear otherwise.
at::Tensor LinearFewRows(const at::Tensor& x, const at::Tensor& w);

}  // namespace pollen
