#include "node/cpu_block_forward.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/cpu_matmul.h"
#include "common/float8.h"

namespace pollen::node {
namespace {

// Attention runs on several threads only above this many multiply-adds:
// starting the thread pool costs more than small steps take.
constexpr int64_t kParallelAttentionWork = int64_t{1} << 18;

// Returns e^x for each lane, clamping x to [-87.3, 88]. Its error measured
// 1.4 units in the last place at most, and a loop over a softmax row runs
// about four times faster than with std::exp, which GCC calls once per
// float at this project's -O2. The method is Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2,
// then e^r from a polynomial and 2^n from the exponent bits.
__attribute__((always_inline)) inline Float8 Exp8(Float8 x) {
  const Float8 rounding_magic = Splat(12582912.0f);  // 1.5 * 2^23
  x = x < Splat(-87.3f) ? Splat(-87.3f) : x;
  x = x > Splat(88.0f) ? Splat(88.0f) : x;
  const Float8 n = (x * 1.44269504088896341f + rounding_magic) - rounding_magic;
  Float8 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  Float8 p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Float8 e_r = p * r * r + r + 1.0f;
  const Int8 exponent_bits = (__builtin_convertvector(n, Int8) + 127) << 23;
  Float8 two_to_n;
  __builtin_memcpy(&two_to_n, &exponent_bits, sizeof(two_to_n));
  return e_r * two_to_n;
}

// Returns e^x of one float, for the end of a row that does not fill a vector.
__attribute__((always_inline)) inline float Exp1(float x) {
  return Exp8(Splat(x))[0];
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

// Replaces the scores in `row` [length] by e^(score - max) and returns
// their sum.
__attribute__((always_inline)) inline float ExpShiftedRow(float* row,
                                                          int64_t length) {
  Float8 maxima = Splat(-std::numeric_limits<float>::infinity());
  int64_t s = 0;
  for (; s + 8 <= length; s += 8) {
    const Float8 scores = Load8(row + s);
    maxima = scores > maxima ? scores : maxima;
  }
  float max_score = maxima[0];
  for (int lane = 1; lane < 8; ++lane) max_score = std::max(max_score, maxima[lane]);
  for (; s < length; ++s) max_score = std::max(max_score, row[s]);

  Float8 sums = {};
  s = 0;
  for (; s + 8 <= length; s += 8) {
    const Float8 probabilities = Exp8(Load8(row + s) - max_score);
    Store8(probabilities, row + s);
    sums += probabilities;
  }
  float sum = Sum8(sums);
  for (; s < length; ++s) {
    row[s] = Exp1(row[s] - max_score);
    sum += row[s];
  }
  return sum;
}

// Causal attention of the `group` query heads that share one kv head, for
// one query token that attends to cache positions [0, length). `queries`
// and `outputs` hold the group's vectors of `dim` floats one after
// another, and `scores` has room for group * length floats. This is the
// loop for any head dimension; AttendGroupVectors below is faster for
// multiples of 8.
__attribute__((always_inline)) inline void AttendGroupScalar(
    const float* __restrict__ queries, const float* __restrict__ keys,
    const float* __restrict__ values, int64_t length, int64_t group,
    int64_t dim, float scale, float* __restrict__ scores,
    float* __restrict__ outputs) {
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
    const float inverse_sum = 1.0f / ExpShiftedRow(row, length);
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

// AttendGroupScalar's work for a head dimension kHeadDim that is a multiple
// of 8, in Float8 vectors. Scores come eight keys at a time, with one
// transposed reduction instead of a horizontal sum per key, and the
// weighted sums of the values stay in registers, with the softmax's
// division applied once at the end. Small heads keep several sets of sums,
// so that consecutive multiply-adds do not wait on each other.
template <int64_t kHeadDim>
__attribute__((always_inline)) inline void AttendGroupVectors(
    const float* __restrict__ queries, const float* __restrict__ keys,
    const float* __restrict__ values, int64_t length, int64_t group,
    float scale, float* __restrict__ scores, float* __restrict__ outputs) {
  static_assert(kHeadDim % 8 == 0 && kHeadDim > 0, "whole vectors only");
  constexpr int kChunks = static_cast<int>(kHeadDim / 8);
  constexpr int kSets = kChunks >= 4 ? 1 : 4 / kChunks;

  // Scaled scores for each block of eight keys, which stays in the L1
  // cache while every query head of the group reads it.
  int64_t s = 0;
  for (; s + 8 <= length; s += 8) {
    const float* block = keys + s * kHeadDim;
    for (int64_t j = 0; j < group; ++j) {
      const float* query = queries + j * kHeadDim;
      Float8 sums[8] = {};
#pragma GCC unroll 16
      for (int c = 0; c < kChunks; ++c) {
        const Float8 q = Load8(query + 8 * c);
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          sums[k] += q * Load8(block + k * kHeadDim + 8 * c);
        }
      }
      Store8(TransposedSums(sums) * scale, scores + j * length + s);
    }
  }
  for (; s < length; ++s) {
    for (int64_t j = 0; j < group; ++j) {
      scores[j * length + s] =
          Dot(queries + j * kHeadDim, keys + s * kHeadDim, kHeadDim) * scale;
    }
  }

  for (int64_t j = 0; j < group; ++j) {
    float* row = scores + j * length;
    const float inverse_sum = 1.0f / ExpShiftedRow(row, length);

    // Unnormalized weighted sum of the values, in kSets interleaved sets.
    Float8 sums[kSets][kChunks] = {};
    int64_t t = 0;
    for (; t + kSets <= length; t += kSets) {
#pragma GCC unroll 4
      for (int set = 0; set < kSets; ++set) {
        const Float8 p = Splat(row[t + set]);
        const float* value = values + (t + set) * kHeadDim;
#pragma GCC unroll 16
        for (int c = 0; c < kChunks; ++c) sums[set][c] += p * Load8(value + 8 * c);
      }
    }
    for (; t < length; ++t) {
      const Float8 p = Splat(row[t]);
      const float* value = values + t * kHeadDim;
#pragma GCC unroll 16
      for (int c = 0; c < kChunks; ++c) sums[0][c] += p * Load8(value + 8 * c);
    }
    float* out = outputs + j * kHeadDim;
#pragma GCC unroll 16
    for (int c = 0; c < kChunks; ++c) {
      Float8 total = sums[0][c];
      for (int set = 1; set < kSets; ++set) total += sums[set][c];
      Store8(total * inverse_sum, out + 8 * c);
    }
  }
}

// Attention of one group of query heads (see AttendGroupScalar), with the
// usual head dimensions in vectors. The callers below pick the instruction
// set.
__attribute__((always_inline)) inline void AttendGroupDispatch(
    const float* queries, const float* keys, const float* values,
    int64_t length, int64_t group, int64_t dim, float scale, float* scores,
    float* outputs) {
  switch (dim) {
    case 8:
      return AttendGroupVectors<8>(queries, keys, values, length, group,
                                   scale, scores, outputs);
    case 16:
      return AttendGroupVectors<16>(queries, keys, values, length, group,
                                    scale, scores, outputs);
    case 32:
      return AttendGroupVectors<32>(queries, keys, values, length, group,
                                    scale, scores, outputs);
    case 64:
      return AttendGroupVectors<64>(queries, keys, values, length, group,
                                    scale, scores, outputs);
    case 128:
      return AttendGroupVectors<128>(queries, keys, values, length, group,
                                     scale, scores, outputs);
    default:
      return AttendGroupScalar(queries, keys, values, length, group, dim,
                               scale, scores, outputs);
  }
}

// AttendGroupDispatch for CPUs with FMA (256-bit AVX) and the baseline.
POLLEN_CPU_CLONES
void AttendGroupClones(const float* queries, const float* keys,
                       const float* values, int64_t length, int64_t group,
                       int64_t dim, float scale, float* scores,
                       float* outputs) {
  AttendGroupDispatch(queries, keys, values, length, group, dim, scale, scores,
                      outputs);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The same with AVX2, whose lane-crossing permutes and register broadcasts
// make the transposed sums and the splats of one probability a single
// instruction each, where FMA alone needs two or three.
__attribute__((target("avx2,fma")))
void AttendGroupAvx2(const float* queries, const float* keys,
                     const float* values, int64_t length, int64_t group,
                     int64_t dim, float scale, float* scores, float* outputs) {
  AttendGroupDispatch(queries, keys, values, length, group, dim, scale, scores,
                      outputs);
}
#endif

// Attention of one group of query heads (see AttendGroupScalar) with the
// best instruction set of this CPU.
void AttendGroupAnyDim(const float* queries, const float* keys,
                       const float* values, int64_t length, int64_t group,
                       int64_t dim, float scale, float* scores,
                       float* outputs) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool has_avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) {
    return AttendGroupAvx2(queries, keys, values, length, group, dim, scale,
                           scores, outputs);
  }
#endif
  AttendGroupClones(queries, keys, values, length, group, dim, scale, scores,
                    outputs);
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
    int64_t i = 0;
    for (; i + 8 <= intermediate; i += 8) {
      const Float8 g = Load8(gate + i);
      Store8(g / (1.0f + Exp8(-g)) * Load8(up + i), out_row + i);
    }
    for (; i < intermediate; ++i) {
      out_row[i] = gate[i] / (1.0f + Exp1(-gate[i])) * up[i];
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

TransposedProjections TransposeProjections(const at::Tensor& qkv_proj,
                                           const at::Tensor& o_proj,
                                           const at::Tensor& gate_up_proj,
                                           const at::Tensor& down_proj) {
  TransposedProjections transposed;
  transposed.qkv_proj = TransposeForMatMul(qkv_proj);
  transposed.o_proj = TransposeForMatMul(o_proj);
  transposed.gate_up_proj = TransposeForMatMul(gate_up_proj);
  transposed.down_proj = TransposeForMatMul(down_proj);
  return transposed;
}

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

  // y = x w^T from the transposed copy when there is one.
  const bool use_transposed =
      block.transposed != nullptr && rows <= kLoopMatMulMaxRows;
  auto project = [rows, use_transposed](const float* in_rows, int64_t in,
                                        const at::Tensor& weight,
                                        const TransposedWeight* transposed,
                                        float* out_rows) {
    if (use_transposed) {
      MatMulTransposed(in_rows, rows, *transposed, out_rows);
    } else {
      MatMul(in_rows, rows, in, weight, out_rows);
    }
  };
  const TransposedProjections* copies = block.transposed;

  // Projections of the normalized rows.
  RmsNormRows(x, block.input_layernorm.data_ptr<float>(), rows, width, epsilon,
              normed);
  project(normed, width, block.qkv_proj,
          copies ? &copies->qkv_proj : nullptr, qkv);

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
  project(context, q_width, block.o_proj, copies ? &copies->o_proj : nullptr,
          after_attention);
  AddInto(x, after_attention, rows * width, after_attention);

  // SwiGLU MLP with residual: output = after + down(silu(gate(n)) * up(n)).
  RmsNormRows(after_attention, block.post_attention_layernorm.data_ptr<float>(),
              rows, width, epsilon, normed);
  project(normed, width, block.gate_up_proj,
          copies ? &copies->gate_up_proj : nullptr, gate_up);
  SwiGluRows(gate_up, rows, intermediate, activated);
  project(activated, intermediate, block.down_proj,
          copies ? &copies->down_proj : nullptr, output_data);
  AddInto(after_attention, output_data, rows * width, output_data);
  return output;
}

}  // namespace pollen::node
