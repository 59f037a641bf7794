// A Llama block's forward pass for float32 on the CPU with few libtorch
// calls, for decode steps and other short steps.
//
// An eager libtorch operator costs about 0.5 to 4 microseconds of CPU time
// before it computes anything, and LlamaBlock's operator-by-operator path
// takes about 30 of them per block, which dominates the step time of small
// models. Here the four projections are matrix products (one libtorch call
// each, so large models still get the BLAS library's kernels and threads),
// and RMSNorm, rotary embedding, cache writes, attention, SwiGLU and the
// residual additions are plain loops.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "common/cpu_matmul.h"
#include "node/llama_block.h"

namespace pollen::node {

// Slices with more new tokens than this take LlamaBlock's libtorch path:
// the loops here compute attention one query row at a time, which is slower
// than batched matrix products for long prefills.
inline constexpr int64_t kFloatCpuMaxTokens = 16;

// A block's four projections transposed for MatMulTransposed.
struct TransposedProjections {
  TransposedWeight qkv_proj;
  TransposedWeight o_proj;
  TransposedWeight gate_up_proj;
  TransposedWeight down_proj;
};

// Float32 blocks whose weights take at most this many bytes keep a
// transposed copy of their projections (see TransposedProjections). Such
// blocks stay in a core's cache, so arithmetic limits their steps, and
// MatMulTransposed took about a quarter of MatMul's time for 8 rows of
// stories260k (measured on a 2-core Xeon). Larger blocks are limited by
// reading their weights, which a copy would not speed up but would double.
inline constexpr int64_t kTransposedCopyMaxBytes = int64_t{8} << 20;

// Returns transposed copies of a block's four projection weights.
TransposedProjections TransposeProjections(const at::Tensor& qkv_proj,
                                           const at::Tensor& o_proj,
                                           const at::Tensor& gate_up_proj,
                                           const at::Tensor& down_proj);

// The shapes and weights of one block, all float32 on the CPU. The tensors
// share storage with the LlamaBlock they come from.
struct FloatCpuBlock {
  int64_t hidden_size = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  double rms_norm_eps = 0;
  at::Tensor input_layernorm;           // [hidden]
  at::Tensor qkv_proj;                  // [(heads + 2 kv_heads) * head_dim, hidden]
  at::Tensor o_proj;                    // [hidden, heads * head_dim]
  at::Tensor post_attention_layernorm;  // [hidden]
  at::Tensor gate_up_proj;              // [2 * intermediate, hidden]
  at::Tensor down_proj;                 // [hidden, intermediate]
  at::Tensor rotary_cos;                // [max_positions, head_dim]
  at::Tensor rotary_sin;                // [max_positions, head_dim]
  // When set, the projections above in transposed form, which the matrix
  // products of up to kLoopMatMulMaxRows rows use instead.
  const TransposedProjections* transposed = nullptr;
};

// Runs `block` on `hidden` [rows, hidden_size] like LlamaBlock::ForwardBatch
// and returns [rows, hidden_size]. Requires (and does not check) float32 CPU
// tensors, contiguous weights and caches, slices that LlamaBlock::CheckSlice
// accepted, and rows that add up. The results agree with LlamaBlock's libtorch path to
// float32 rounding, not bit for bit.
at::Tensor ForwardFloatCpu(const FloatCpuBlock& block, const at::Tensor& hidden,
                           const std::vector<SequenceSlice>& slices);

}  // namespace pollen::node
