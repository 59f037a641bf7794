// Bias-free linear layers whose weights may be stored as int8 with one
// scale per output channel (weight-only quantisation), and the node's choice
// of quantisation.
#pragma once

#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"

namespace pollen::node {

// Storage format of a block's linear weights.
enum class Quantization {
  kNone,  // in the block's dtype
  kInt8,  // int8 with a float32 scale per output channel
};

// Parses "none" or "int8"; INVALID_ARGUMENT naming the value otherwise.
absl::StatusOr<Quantization> ParseQuantization(const std::string& name);

// "none" or "int8".
std::string QuantizationName(Quantization quantization);

// A matrix W [out, in] quantised symmetrically per row:
// scales[r] = max_c |W[r, c]| / 127 and values = round(W / scales[r]), so
// values lie in [-127, 127] and |W - values * scales| <= scales[r] / 2
// element-wise. A row of zeros gets scale 1 and values 0.
struct Int8Matrix {
  at::Tensor values;  // int8 [out, in]
  at::Tensor scales;  // float32 [out]
};

// Quantises `weight` [out, in] of any float dtype; the result is on the
// weight's device. Throws c10::Error when `weight` is not a 2-D float tensor
// or contains a value that is not finite.
Int8Matrix QuantizeInt8(const at::Tensor& weight);

// values * scales[:, None] as [out, in] in `dtype`.
at::Tensor DequantizeInt8(const Int8Matrix& matrix, at::ScalarType dtype);

// y = x W^T for a weight W [out, in] that is kept either as given
// (Quantization::kNone) or as an Int8Matrix (Quantization::kInt8). Inputs
// and outputs are in `dtype` either way.
//
// An int8 layer converts its weight to `dtype` in tiles of rows at every
// call, so the extra memory stays at one tile of about kInt8TileBytes
// whatever the matrix size. Under autograd its backward pass computes the
// input gradient from the same tiles of the dequantised weight; the weight
// itself gets no gradient.
//
// Immutable after construction, so Forward is thread-safe.
class QuantizedLinear {
 public:
  // Bytes of W converted to the compute dtype at a time. A tile this small
  // is still in the CPU cache when the matmul reads it. One float32 token
  // through a [11264, 2048] int8 weight took 3-4 ms with 2 MiB tiles, and
  // 18-19 ms with 8 MiB tiles or as a plain float32 weight. That was measured
  // with libtorch 1.13.1 and OpenBLAS on a 2-core AMD EPYC, and other CPUs
  // may prefer another size.
  static constexpr int64_t kInt8TileBytes = int64_t{2} << 20;

  QuantizedLinear() = default;

  // Stores `weight` [out, in] (any float dtype, on the device the layer
  // runs on) in the format `quantization` selects, for inputs in `dtype`.
  // Throws c10::Error when `weight` is not a 2-D float tensor, or, for
  // kInt8, contains a value that is not finite.
  QuantizedLinear(const at::Tensor& weight, Quantization quantization,
                  at::ScalarType dtype);

  // x [..., in] in dtype() on device() -> [..., out] in dtype(). Throws
  // c10::Error when the last dimension of `x` is not in_features().
  at::Tensor Forward(const at::Tensor& x) const;

  // W as [out, in] in dtype(): the weight itself for kNone, values * scales
  // for kInt8.
  at::Tensor DequantizedWeight() const;

  Quantization quantization() const { return quantization_; }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return weight_.device(); }
  int64_t out_features() const { return weight_.size(0); }
  int64_t in_features() const { return weight_.size(1); }

  // Bytes of the stored weight, scales included.
  int64_t ParameterBytes() const;

 private:
  Quantization quantization_ = Quantization::kNone;
  at::ScalarType dtype_ = at::kFloat;
  // kNone: W [out, in] in dtype_. kInt8: the int8 values [out, in].
  at::Tensor weight_;
  // kInt8 only: float32 [out].
  at::Tensor scales_;
};

}  // namespace pollen::node
