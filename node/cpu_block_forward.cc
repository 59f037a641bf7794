#include "node/cpu_block_forward.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

// The loops below are compiled twice on x86-64 with GCC: with FMA (which
// implies 256-bit AVX) and for the baseline instruction set. The dynamic
// loader picks the clone by the CPU's features ("arch=" clones would match
// the CPU model instead).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define POLLEN_CPU_CLONES __attribute__((target_clones("fma", "default")))
#else
#define POLLEN_CPU_CLONES
#endif

namespace pollen::node {
namespace {

// Matrix products of up to this many rows run in the loops here, which
// read each weight once, like a matrix-vector product. Larger ones go to
// libtorch's BLAS matrix product. Measured on the 2-core EPYC this was
// written on: with one row and a 2560 x 2048 float32 weight, OpenBLAS
// 0.3.21 (Debian 12) takes about 4 ms of CPU time in sgemm and 0.5 ms in
// sgemv. The tiled loops take 0.5 ms, and with 8 rows 1.5 ms against 4 ms.
constexpr int64_t kLoopMatMulMaxRows = 16;

// The loops split the output features over threads above this many
// multiply-adds per thread.
constexpr int64_t kParallelMatMulWork = int64_t{1} << 20;

// Attention runs on several threads only above this many multiply-adds:
// starting the thread pool costs more than small steps take.
constexpr int64_t kParallelAttentionWork = int64_t{1} << 18;

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

// y = x w^T for x [rows, in] and a contiguous weight w [out, in].
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

// out[r] = x[r] / rms(x[r]) * weight for each of `rows` rows of `width`.
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

// Rotates `heads` vectors of `d` floats in place, in Hugging Face's
// rotate-half layout: x * cos + cat(-x2, x1) * sin.
void Rotate(float* x, const float* cos, const float* sin, int64_t heads,
            int64_t d) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * d;
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = v[j];
      const float x2 = v[j + half];
      v[j] = x1 * cos[j] - x2 * sin[j];
      v[j + half] = x2 * cos[j + half] + x1 * sin[j + half];
    }
  }
}

// Causal attention of the `group` query heads that share one kv head, for
// one query token that attends to cache positions [0, length). `queries`
// and `outputs` hold the group's vectors of `dim` floats one after
// another, and `scores` has room for group * length floats. kHeadDim is the
// head dimension when it is known at compile time (so that the inner loops
// unroll), or 0 to use `runtime_dim`.
template <int64_t kHeadDim>
__attribute__((always_inline)) inline void AttendGroup(
    const float* __restrict__ queries, const float* __restrict__ keys,
    const float* __restrict__ values, int64_t length, int64_t group,
    int64_t runtime_dim, float scale, float* __restrict__ scores,
    float* __restrict__ outputs) {
  const int64_t dim = kHeadDim > 0 ? kHeadDim : runtime_dim;

  // Scaled scores, one row of `length` per query head; each key is read
  // once for the whole group.
  for (int64_t s = 0; s < length; ++s) {
    const float* key = keys + s * dim;
    for (int64_t j = 0; j < group; ++j) {
      scores[j * length + s] = Dot(queries + j * dim, key, dim) * scale;
    }
  }

  // Softmax per head, in float32; the probabilities replace the scores.
  for (int64_t j = 0; j < group; ++j) {
    float* row = scores + j * length;
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < length; ++s) max_score = std::max(max_score, row[s]);
    float sum = 0;
    for (int64_t s = 0; s < length; ++s) {
      row[s] = std::exp(row[s] - max_score);
      sum += row[s];
    }
    const float inverse_sum = 1.0f / sum;
    for (int64_t s = 0; s < length; ++s) row[s] *= inverse_sum;
  }

  // Weighted sums of the values; each value is read once for the group.
  std::fill(outputs, outputs + group * dim, 0.0f);
  for (int64_t s = 0; s < length; ++s) {
    const float* value = values + s * dim;
    for (int64_t j = 0; j < group; ++j) {
      const float p = scores[j * length + s];
      float* out = outputs + j * dim;
      for (int64_t e = 0; e < dim; ++e) out[e] += p * value[e];
    }
  }
}

// AttendGroup with the usual head dimensions unrolled.
POLLEN_CPU_CLONES
void AttendGroupAnyDim(const float* queries, const float* keys,
                       const float* values, int64_t length, int64_t group,
                       int64_t dim, float scale, float* scores,
                       float* outputs) {
  switch (dim) {
    case 8:
      return AttendGroup<8>(queries, keys, values, length, group, dim, scale,
                            scores, outputs);
    case 16:
      return AttendGroup<16>(queries, keys, values, length, group, dim, scale,
                             scores, outputs);
    case 32:
      return AttendGroup<32>(queries, keys, values, length, group, dim, scale,
                             scores, outputs);
    case 64:
      return AttendGroup<64>(queries, keys, values, length, group, dim, scale,
                             scores, outputs);
    case 128:
      return AttendGroup<128>(queries, keys, values, length, group, dim, scale,
                              scores, outputs);
    default:
      return AttendGroup<0>(queries, keys, values, length, group, dim, scale,
                            scores, outputs);
  }
}

// out = x + y, element-wise over n floats.
POLLEN_CPU_CLONES
void AddInto(const float* x, const float* y, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] + y[i];
}

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, intermediate + i].
POLLEN_CPU_CLONES
void SwiGluRows(const float* __restrict__ gate_up, int64_t rows,
                int64_t intermediate, float* __restrict__ out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = gate_up + r * 2 * intermediate;
    const float* up = gate + intermediate;
    float* out_row = out + r * intermediate;
    for (int64_t i = 0; i < intermediate; ++i) {
      out_row[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    }
  }
}

// One unit of attention work: kv head `kv_head` of sequence `sequence` of a
// slice, whose rows start at `first_row`.
struct AttentionTask {
  const SequenceSlice* slice;
  int64_t first_row;
  int64_t sequence;
  int64_t kv_head;
};

// Scratch of up to this many floats (64 MiB) stays allocated per thread.
constexpr size_t kKeptWorkspaceFloats = size_t{1} << 24;

// Scratch memory of `floats` floats. Small scratch belongs to the calling
// thread and is reused from call to call, so that a decode step allocates
// nothing but its output. Larger scratch lives in `fallback`.
float* Workspace(size_t floats, std::vector<float>& fallback) {
  thread_local std::vector<float> workspace;
  if (floats > kKeptWorkspaceFloats) {
    fallback.resize(floats);
    return fallback.data();
  }
  if (workspace.size() < floats) workspace.resize(floats);
  return workspace.data();
}

}  // namespace

at::Tensor ForwardFloatCpu(const FloatCpuBlock& block, const at::Tensor& hidden,
                           const std::vector<SequenceSlice>& slices) {
  const int64_t rows = hidden.size(0);
  const int64_t width = block.hidden_size;
  const int64_t d = block.head_dim;
  const int64_t heads = block.num_heads;
  const int64_t kv_heads = block.num_kv_heads;
  const int64_t group = heads / kv_heads;
  const int64_t q_width = heads * d;
  const int64_t kv_width = kv_heads * d;
  const int64_t qkv_width = q_width + 2 * kv_width;
  const int64_t intermediate = block.down_proj.size(1);
  const float epsilon = static_cast<float>(block.rms_norm_eps);

  const at::Tensor input = hidden.contiguous();
  const float* x = input.data_ptr<float>();
  at::Tensor output = at::empty({rows, width}, at::TensorOptions().dtype(at::kFloat));
  float* output_data = output.data_ptr<float>();

  // Scratch: normed [rows, width], qkv [rows, qkv_width], context
  // [rows, q_width], after_attention [rows, width], gate_up
  // [rows, 2 * intermediate], activated [rows, intermediate].
  std::vector<float> large_workspace;
  float* normed = Workspace(
      rows * (3 * width + qkv_width + q_width + 3 * intermediate),
      large_workspace);
  float* qkv = normed + rows * width;
  float* context = qkv + rows * qkv_width;
  float* after_attention = context + rows * q_width;
  float* gate_up = after_attention + rows * width;
  float* activated = gate_up + rows * 2 * intermediate;

  // Projections of the normalized rows.
  RmsNormRows(x, block.input_layernorm.data_ptr<float>(), rows, width, epsilon,
              normed);
  MatMul(normed, rows, width, block.qkv_proj, qkv);

  // Rotary embedding of q and k at their positions, and k and v into the
  // caches [batch, kv_heads, max_length, d].
  std::vector<AttentionTask> tasks;
  int64_t attention_work = 0;
  int64_t row = 0;
  const float* rotary_cos = block.rotary_cos.data_ptr<float>();
  const float* rotary_sin = block.rotary_sin.data_ptr<float>();
  for (const SequenceSlice& slice : slices) {
    float* keys = slice.cache->keys.data_ptr<float>();
    float* values = slice.cache->values.data_ptr<float>();
    const int64_t max_length = slice.cache->keys.size(2);
    for (int64_t b = 0; b < slice.batch; ++b) {
      for (int64_t t = 0; t < slice.tokens; ++t) {
        const int64_t position = slice.position + t;
        float* q = qkv + (row + b * slice.tokens + t) * qkv_width;
        float* k = q + q_width;
        const float* v = k + kv_width;
        Rotate(q, rotary_cos + position * d, rotary_sin + position * d, heads, d);
        Rotate(k, rotary_cos + position * d, rotary_sin + position * d,
               kv_heads, d);
        for (int64_t g = 0; g < kv_heads; ++g) {
          const int64_t offset = ((b * kv_heads + g) * max_length + position) * d;
          std::copy(k + g * d, k + (g + 1) * d, keys + offset);
          std::copy(v + g * d, v + (g + 1) * d, values + offset);
        }
      }
      for (int64_t g = 0; g < kv_heads; ++g) {
        tasks.push_back(AttentionTask{&slice, row, b, g});
      }
    }
    attention_work += slice.batch * heads * slice.tokens *
                      (slice.position + slice.tokens) * d;
    row += slice.batch * slice.tokens;
  }

  // Causal attention: the token at position p attends to cache positions
  // [0, p]. The context rows hold the heads in order, as o_proj expects.
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const int64_t task_count = static_cast<int64_t>(tasks.size());
  const int64_t grain =
      attention_work < kParallelAttentionWork ? std::max<int64_t>(task_count, 1) : 1;
  at::parallel_for(0, task_count, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const AttentionTask& task = tasks[i];
      const SequenceSlice& slice = *task.slice;
      const int64_t max_length = slice.cache->keys.size(2);
      const int64_t cache_offset =
          (task.sequence * kv_heads + task.kv_head) * max_length * d;
      const float* keys = slice.cache->keys.data_ptr<float>() + cache_offset;
      const float* values = slice.cache->values.data_ptr<float>() + cache_offset;
      scores.resize(group * (slice.position + slice.tokens));
      for (int64_t t = 0; t < slice.tokens; ++t) {
        const int64_t query_row = task.first_row + task.sequence * slice.tokens + t;
        const int64_t first_head = task.kv_head * group * d;
        AttendGroupAnyDim(qkv + query_row * qkv_width + first_head, keys, values,
                          slice.position + t + 1, group, d, scale, scores.data(),
                          context + query_row * q_width + first_head);
      }
    }
  });

  // Attention output with residual: after = hidden + context o_proj^T.
  MatMul(context, rows, q_width, block.o_proj, after_attention);
  AddInto(x, after_attention, rows * width, after_attention);

  // SwiGLU MLP with residual: output = after + down(silu(gate(n)) * up(n)).
  RmsNormRows(after_attention, block.post_attention_layernorm.data_ptr<float>(),
              rows, width, epsilon, normed);
  MatMul(normed, rows, width, block.gate_up_proj, gate_up);
  SwiGluRows(gate_up, rows, intermediate, activated);
  MatMul(activated, rows, intermediate, block.down_proj, output_data);
  AddInto(after_attention, output_data, rows * width, output_data);
  return output;
}

}  // namespace pollen::node
