#include "common/activation_compression.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace pollen {
namespace {

// Adding and subtracting 1.5 * 2^23 rounds a float32 of magnitude below
// 2^22 to the nearest integer, ties to even, in the default rounding mode.
// It takes two additions where std::nearbyint may call the math library.
constexpr float kRoundingMagic = 12582912.0f;

// Bits of a float32 +infinity. With the sign bit cleared, every larger bit
// pattern is a NaN.
constexpr uint32_t kInfinityBits = 0x7f800000u;

int64_t NumBlocks(int64_t numel) {
  return (numel + kInt8BlockSize - 1) / kInt8BlockSize;
}

// The dtype whose bytes FLOAT16 and BFLOAT16 carry.
at::ScalarType WireScalarType(v1::Compression compression) {
  return compression == v1::COMPRESSION_FLOAT16 ? at::kHalf : at::kBFloat16;
}

// Encodes the block of `count` values at `values` and writes its scale and
// quantized values. Returns false when a value is NaN or infinite. Full
// blocks pass kInt8BlockSize as a constant, and the pointers are
// __restrict, because GCC 12 at -O2 vectorizes these loops only with a
// constant trip count and without a run-time aliasing check.
template <typename Count>
bool EncodeInt8Block(const float* __restrict values, Count count,
                     float* scale, int8_t* __restrict quantized) {
  // The bits of |x| without the sign order like |x|, and those of NaN and
  // infinity are the largest, so one integer max finds both the absmax and
  // any non-finite value.
  uint32_t max_magnitude_bits = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &values[i], sizeof(bits));
    bits &= 0x7fffffffu;
    max_magnitude_bits = bits > max_magnitude_bits ? bits : max_magnitude_bits;
  }
  if (max_magnitude_bits >= kInfinityBits) return false;
  float absmax;
  std::memcpy(&absmax, &max_magnitude_bits, sizeof(absmax));

  *scale = absmax / 127.0f;
  if (absmax == 0.0f) {
    std::memset(quantized, 0, count);
    return true;
  }
  const float block_scale = *scale;
  for (int64_t i = 0; i < count; ++i) {
    // |x / scale| exceeds 127 by a rounding error at most, so it is
    // rounded first and clamped as an integer, which vectorizes.
    const float rounded =
        (values[i] / block_scale + kRoundingMagic) - kRoundingMagic;
    int32_t q = static_cast<int32_t>(rounded);
    q = q > 127 ? 127 : q;
    q = q < -127 ? -127 : q;
    quantized[i] = static_cast<int8_t>(q);
  }
  return true;
}

absl::Status EncodeInt8Blockwise(const at::Tensor& tensor, std::string* out) {
  // A float32 contiguous CPU tensor is used in place, and others are
  // converted.
  const at::Tensor values = tensor.to(at::kCPU, at::kFloat).contiguous();
  const int64_t numel = values.numel();
  const int64_t blocks = NumBlocks(numel);
  out->resize(blocks * sizeof(float) + numel);
  if (numel == 0) return absl::OkStatus();

  const float* input = values.data_ptr<float>();
  char* scales = out->data();
  int8_t* quantized = reinterpret_cast<int8_t*>(out->data() + blocks * sizeof(float));
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t begin = block * kInt8BlockSize;
    const int64_t count = std::min(kInt8BlockSize, numel - begin);
    float scale = 0.0f;
    const bool finite =
        count == kInt8BlockSize
            ? EncodeInt8Block(input + begin,
                              std::integral_constant<int64_t, kInt8BlockSize>(),
                              &scale, quantized + begin)
            : EncodeInt8Block(input + begin, count, &scale, quantized + begin);
    if (!finite) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot encode a tensor with NaN or infinite values as int8: block ",
          block, " (elements ", begin, " to ", begin + count - 1,
          ") has one; send it without compression or fix the values"));
    }
    // The scales may be unaligned, so they are written with memcpy.
    std::memcpy(scales + block * sizeof(float), &scale, sizeof(float));
  }
  return absl::OkStatus();
}

// Restores the `count` values of one block and returns false when one of
// them is -128. A template for the same reason as EncodeInt8Block.
template <typename Count>
bool DecodeInt8Block(const int8_t* __restrict quantized, Count count,
                     float scale, float* __restrict output) {
  int32_t lowest = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int32_t value = quantized[i];
    lowest = value < lowest ? value : lowest;
    output[i] = static_cast<float>(value) * scale;
  }
  return lowest != -128;
}

absl::StatusOr<at::Tensor> DecodeInt8Blockwise(absl::string_view data,
                                               at::IntArrayRef shape,
                                               at::ScalarType dtype,
                                               const std::string& what) {
  at::Tensor decoded = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  const int64_t numel = decoded.numel();
  const int64_t blocks = NumBlocks(numel);
  const char* scales = data.data();
  const int8_t* quantized =
      reinterpret_cast<const int8_t*>(data.data() + blocks * sizeof(float));
  float* output = decoded.data_ptr<float>();

  for (int64_t block = 0; block < blocks; ++block) {
    float scale = 0.0f;
    std::memcpy(&scale, scales + block * sizeof(float), sizeof(float));
    if (!(scale >= 0.0f && scale <= FLT_MAX)) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": int8 block ", block, " has scale ", scale,
          "; expected a finite value >= 0"));
    }

    const int64_t begin = block * kInt8BlockSize;
    const int64_t count = std::min(kInt8BlockSize, numel - begin);
    const bool in_range =
        count == kInt8BlockSize
            ? DecodeInt8Block(quantized + begin,
                              std::integral_constant<int64_t, kInt8BlockSize>(),
                              scale, output + begin)
            : DecodeInt8Block(quantized + begin, count, scale, output + begin);
    if (!in_range) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": int8 block ", block,
          " holds the value -128; expected values in [-127, 127]"));
    }
  }
  if (dtype == at::kFloat) return decoded;
  return decoded.to(dtype);
}

absl::StatusOr<at::Tensor> DecodeHalfPrecision(absl::string_view data,
                                               v1::Compression compression,
                                               at::IntArrayRef shape,
                                               at::ScalarType dtype) {
  const at::ScalarType wire_type = WireScalarType(compression);
  const auto wire_options = at::TensorOptions().dtype(wire_type);
  const bool aligned =
      reinterpret_cast<uintptr_t>(data.data()) % c10::elementSize(wire_type) == 0;

  // An aligned buffer is read in place; the result never aliases it.
  at::Tensor encoded;
  if (aligned && !data.empty()) {
    encoded = at::from_blob(const_cast<char*>(data.data()), shape, wire_options);
    return dtype == wire_type ? encoded.clone() : encoded.to(dtype);
  }
  encoded = at::empty(shape, wire_options);
  if (!data.empty()) std::memcpy(encoded.data_ptr(), data.data(), data.size());
  return dtype == wire_type ? encoded : encoded.to(dtype);
}

}  // namespace

absl::StatusOr<v1::Compression> ParseCompression(const std::string& name) {
  if (name == "none") return v1::COMPRESSION_NONE;
  if (name == "fp16" || name == "float16") return v1::COMPRESSION_FLOAT16;
  if (name == "bf16" || name == "bfloat16") return v1::COMPRESSION_BFLOAT16;
  if (name == "int8" || name == "int8_blockwise") {
    return v1::COMPRESSION_INT8_BLOCKWISE;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown compression '", name,
      "'; use none, fp16 (float16), bf16 (bfloat16) or int8 (int8_blockwise)"));
}

std::string CompressionName(v1::Compression compression) {
  switch (compression) {
    case v1::COMPRESSION_NONE:
      return "none";
    case v1::COMPRESSION_FLOAT16:
      return "fp16";
    case v1::COMPRESSION_BFLOAT16:
      return "bf16";
    case v1::COMPRESSION_INT8_BLOCKWISE:
      return "int8";
    default:
      return absl::StrCat("unknown(", static_cast<int>(compression), ")");
  }
}

absl::Status CheckCompression(v1::Compression compression) {
  if (v1::Compression_IsValid(compression)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown compression ", static_cast<int>(compression),
      "; expected NONE, FLOAT16, BFLOAT16 or INT8_BLOCKWISE (0 to 3)"));
}

absl::StatusOr<int64_t> CompressedBytes(v1::Compression compression,
                                        int64_t numel) {
  switch (compression) {
    case v1::COMPRESSION_FLOAT16:
    case v1::COMPRESSION_BFLOAT16:
      return numel * 2;
    case v1::COMPRESSION_INT8_BLOCKWISE:
      return NumBlocks(numel) * static_cast<int64_t>(sizeof(float)) + numel;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "compression ", CompressionName(compression),
          " has no fixed size per element; expected fp16, bf16 or int8"));
  }
}

absl::Status EncodeActivations(const at::Tensor& tensor,
                               v1::Compression compression, std::string* out) {
  const at::ScalarType type = tensor.scalar_type();
  if (type != at::kFloat && type != at::kHalf && type != at::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot compress a tensor of dtype ", c10::toString(type),
        "; expected float32, float16 or bfloat16"));
  }

  switch (compression) {
    case v1::COMPRESSION_FLOAT16:
    case v1::COMPRESSION_BFLOAT16: {
      const at::ScalarType wire_type = WireScalarType(compression);
      out->resize(tensor.numel() * c10::elementSize(wire_type));
      if (tensor.numel() == 0) return absl::OkStatus();
      // The conversion writes straight into `out`, from any device and
      // layout, without an intermediate tensor.
      at::from_blob(out->data(), tensor.sizes(),
                    at::TensorOptions().dtype(wire_type))
          .copy_(tensor);
      return absl::OkStatus();
    }
    case v1::COMPRESSION_INT8_BLOCKWISE:
      return EncodeInt8Blockwise(tensor, out);
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot encode with compression ", CompressionName(compression),
          "; expected fp16, bf16 or int8"));
  }
}

absl::StatusOr<at::Tensor> DecodeActivations(absl::string_view data,
                                             v1::Compression compression,
                                             at::IntArrayRef shape,
                                             at::ScalarType dtype,
                                             const std::string& what) {
  // TensorFromProto checks shapes before it gets here. The check is
  // repeated so that no shape can overflow the byte counts below, which
  // reach 4 bytes per element for float32.
  constexpr int64_t kMaxElements = INT64_MAX / 8;
  int64_t numel = 1;
  for (const int64_t dim : shape) {
    if (dim < 0 || (dim != 0 && numel > kMaxElements / dim)) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " has invalid shape [", absl::StrJoin(shape, ", "), "]"));
    }
    numel *= dim;
  }
  const absl::StatusOr<int64_t> expected = CompressedBytes(compression, numel);
  if (!expected.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", expected.status().message()));
  }
  if (static_cast<int64_t>(data.size()) != *expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " has ", data.size(), " data bytes, but shape [",
        absl::StrJoin(shape, ", "), "] with compression ",
        CompressionName(compression), " needs ", *expected));
  }

  if (compression == v1::COMPRESSION_INT8_BLOCKWISE) {
    return DecodeInt8Blockwise(data, shape, dtype, what);
  }
  return DecodeHalfPrecision(data, compression, shape, dtype);
}

}  // namespace pollen
