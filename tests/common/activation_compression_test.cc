// Lossy activation encodings through TensorToProto and TensorFromProto:
// round trips with per-mode error bounds, odd sizes, and hostile bytes.
#include "common/activation_compression.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "common/tensor_codec.h"

namespace pollen {
namespace {

const v1::Compression kLossy[] = {v1::COMPRESSION_FLOAT16,
                                  v1::COMPRESSION_BFLOAT16,
                                  v1::COMPRESSION_INT8_BLOCKWISE};
const at::ScalarType kDtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};

// Encodes and decodes `original`, checking the wire fields on the way.
at::Tensor RoundTrip(const at::Tensor& original, v1::Compression compression) {
  v1::Tensor proto;
  const absl::Status encoded = TensorToProto(original, &proto, compression);
  EXPECT_TRUE(encoded.ok()) << encoded;
  EXPECT_EQ(proto.compression(), compression);
  auto expected_bytes = CompressedBytes(compression, original.numel());
  EXPECT_TRUE(expected_bytes.ok());
  EXPECT_EQ(static_cast<int64_t>(proto.data().size()), *expected_bytes);

  auto decoded = TensorFromProto(proto, "hidden_states");
  EXPECT_TRUE(decoded.ok()) << decoded.status();
  if (!decoded.ok()) return at::Tensor();
  EXPECT_EQ(decoded->scalar_type(), original.scalar_type());
  EXPECT_EQ(decoded->sizes(), original.sizes());

  auto view = TensorViewFromProto(proto, "hidden_states");
  EXPECT_TRUE(view.ok()) << view.status();
  if (view.ok()) EXPECT_TRUE(at::equal(*view, *decoded));
  return *decoded;
}

// Largest |decoded - original| / |original| over elements whose magnitude
// is at least 1e-3 (float16 subnormals lose relative precision below that).
double MaxRelativeError(const at::Tensor& decoded, const at::Tensor& original) {
  const at::Tensor expected = original.to(at::kFloat);
  const at::Tensor actual = decoded.to(at::kFloat);
  const at::Tensor mask = expected.abs() >= 1e-3;
  const at::Tensor relative =
      ((actual - expected).abs() / expected.abs()).masked_select(mask);
  return relative.numel() == 0 ? 0 : relative.max().item<double>();
}

// A hidden-state-like tensor: normal values with a few large outliers.
at::Tensor Activations(at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor values = at::randn(shape);
  if (values.numel() > 10) values.view({-1}).slice(0, 0, 10, 3).mul_(40);
  return values.to(dtype);
}

TEST(ActivationCompression, HalfPrecisionWithinRelativeBound) {
  at::manual_seed(1);
  for (const at::ScalarType dtype : kDtypes) {
    SCOPED_TRACE(c10::toString(dtype));
    const at::Tensor original = Activations({2, 7, 96}, dtype);

    // float16 keeps 11 significant bits (relative error up to 2^-11, about
    // 4.9e-4) and bfloat16 keeps 8 (up to 2^-8, about 3.9e-3).
    const at::Tensor fp16 = RoundTrip(original, v1::COMPRESSION_FLOAT16);
    ASSERT_TRUE(fp16.defined());
    EXPECT_LE(MaxRelativeError(fp16, original), 1e-3);

    const at::Tensor bf16 = RoundTrip(original, v1::COMPRESSION_BFLOAT16);
    ASSERT_TRUE(bf16.defined());
    EXPECT_LE(MaxRelativeError(bf16, original), 8e-3);
  }
}

TEST(ActivationCompression, MatchingDtypeIsExact) {
  at::manual_seed(2);
  const at::Tensor half = at::randn({3, 65}).to(at::kHalf);
  EXPECT_TRUE(at::equal(RoundTrip(half, v1::COMPRESSION_FLOAT16), half));
  const at::Tensor bf16 = at::randn({3, 65}).to(at::kBFloat16);
  EXPECT_TRUE(at::equal(RoundTrip(bf16, v1::COMPRESSION_BFLOAT16), bf16));
}

TEST(ActivationCompression, Int8WithinHalfScalePerElement) {
  at::manual_seed(3);
  for (const at::ScalarType dtype : kDtypes) {
    SCOPED_TRACE(c10::toString(dtype));
    // 3 * 5 * 67 = 1005 elements: 15 full blocks and one of 45.
    const at::Tensor original = Activations({3, 5, 67}, dtype);
    const at::Tensor decoded =
        RoundTrip(original, v1::COMPRESSION_INT8_BLOCKWISE);
    ASSERT_TRUE(decoded.defined());

    const at::Tensor values = original.to(at::kFloat).reshape({-1});
    const at::Tensor restored = decoded.to(at::kFloat).reshape({-1});
    const int64_t numel = values.numel();
    for (int64_t begin = 0; begin < numel; begin += kInt8BlockSize) {
      const int64_t count = std::min(kInt8BlockSize, numel - begin);
      const at::Tensor block = values.slice(0, begin, begin + count);
      const double scale = block.abs().max().item<double>() / 127.0;
      const double error = (restored.slice(0, begin, begin + count) - block)
                               .abs()
                               .max()
                               .item<double>();
      // Rounding the result to a float16 or bfloat16 output adds up to that
      // dtype's relative precision times the block's largest value.
      const double output_rounding =
          dtype == at::kFloat ? 1e-6 : (dtype == at::kHalf ? 1e-3 : 8e-3);
      EXPECT_LE(error, scale / 2 * (1 + 1e-5) + 127 * scale * output_rounding)
          << "block starting at element " << begin;
    }
  }
}

TEST(ActivationCompression, Int8LayoutMatchesProtoComment) {
  // One block of 3 values: scale = absmax / 127, then round(x / scale).
  const at::Tensor original = at::tensor({2.54f, -1.0f, 0.0f});
  v1::Tensor proto;
  ASSERT_TRUE(
      TensorToProto(original, &proto, v1::COMPRESSION_INT8_BLOCKWISE).ok());
  ASSERT_EQ(proto.data().size(), 4u + 3u);
  float scale = 0;
  std::memcpy(&scale, proto.data().data(), sizeof(float));
  EXPECT_FLOAT_EQ(scale, 2.54f / 127);
  EXPECT_EQ(static_cast<int8_t>(proto.data()[4]), 127);
  EXPECT_EQ(static_cast<int8_t>(proto.data()[5]), -50);
  EXPECT_EQ(static_cast<int8_t>(proto.data()[6]), 0);
}

TEST(ActivationCompression, ZeroBlockHasZeroScale) {
  // 64 zeros, then one block of 2 values.
  at::Tensor original = at::zeros({66});
  original[64] = 1.0f;
  original[65] = -0.5f;
  v1::Tensor proto;
  ASSERT_TRUE(
      TensorToProto(original, &proto, v1::COMPRESSION_INT8_BLOCKWISE).ok());
  float scales[2];
  std::memcpy(scales, proto.data().data(), sizeof(scales));
  EXPECT_EQ(scales[0], 0.0f);
  EXPECT_FLOAT_EQ(scales[1], 1.0f / 127);
  auto decoded = TensorFromProto(proto, "x");
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(at::equal(decoded->slice(0, 0, 64), at::zeros({64})));
}

TEST(ActivationCompression, OddAndEmptySizes) {
  at::manual_seed(4);
  const std::vector<std::vector<int64_t>> shapes = {
      {0}, {1, 0, 64}, {1}, {63}, {64}, {65}, {1, 1, 127}, {2, 3, 129}};
  for (const v1::Compression compression : kLossy) {
    for (const std::vector<int64_t>& shape : shapes) {
      SCOPED_TRACE(CompressionName(compression) + " numel " +
                   std::to_string(at::ones(shape).numel()));
      const at::Tensor original = at::randn(shape);
      const at::Tensor decoded = RoundTrip(original, compression);
      ASSERT_TRUE(decoded.defined());
      EXPECT_TRUE(at::allclose(decoded, original, 1e-2, 2e-2));
    }
  }
}

TEST(ActivationCompression, EncodesNonContiguousInput) {
  const at::Tensor original = at::randn({70, 3}).t();
  for (const v1::Compression compression : kLossy) {
    SCOPED_TRACE(CompressionName(compression));
    const at::Tensor decoded = RoundTrip(original, compression);
    ASSERT_TRUE(decoded.defined());
    EXPECT_TRUE(at::allclose(decoded, original, 1e-2, 2e-2));
  }
}

TEST(ActivationCompression, Int8RejectsNonFiniteInput) {
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::infinity()}) {
    at::Tensor original = at::randn({130});
    original[100] = bad;
    v1::Tensor proto;
    const absl::Status status =
        TensorToProto(original, &proto, v1::COMPRESSION_INT8_BLOCKWISE);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(status.message().find("block 1"), std::string::npos) << status;
  }
}

// A valid int8 message of 100 float32 elements (2 blocks) to corrupt.
v1::Tensor ValidInt8Proto() {
  v1::Tensor proto;
  EXPECT_TRUE(TensorToProto(at::randn({1, 100}), &proto,
                            v1::COMPRESSION_INT8_BLOCKWISE)
                  .ok());
  return proto;
}

void ExpectInvalid(const v1::Tensor& proto, const std::string& fragment) {
  auto decoded = TensorFromProto(proto, "hidden_states");
  ASSERT_FALSE(decoded.ok());
  EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(decoded.status().message().find(fragment), std::string::npos)
      << decoded.status();
  auto view = TensorViewFromProto(proto, "hidden_states");
  EXPECT_EQ(view.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ActivationCompression, RejectsTruncatedData) {
  v1::Tensor proto = ValidInt8Proto();
  proto.mutable_data()->resize(proto.data().size() - 1);
  ExpectInvalid(proto, "needs 108");

  v1::Tensor half;
  ASSERT_TRUE(
      TensorToProto(at::randn({5}), &half, v1::COMPRESSION_FLOAT16).ok());
  half.mutable_data()->resize(9);
  ExpectInvalid(half, "needs 10");
}

TEST(ActivationCompression, RejectsSizeOfOtherLayout) {
  // Data as long as uncompressed float32 does not pass for int8.
  v1::Tensor proto = ValidInt8Proto();
  proto.mutable_data()->assign(400, '\0');
  ExpectInvalid(proto, "compression int8 needs 108");

  proto.set_compression(v1::COMPRESSION_BFLOAT16);
  ExpectInvalid(proto, "compression bf16 needs 200");
}

TEST(ActivationCompression, RejectsUnknownEnumValue) {
  v1::Tensor proto = ValidInt8Proto();
  proto.set_compression(static_cast<v1::Compression>(99));
  ExpectInvalid(proto, "unknown compression 99");
}

TEST(ActivationCompression, RejectsBadScales) {
  const float bad_scales[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity(), -1.0f};
  for (const float scale : bad_scales) {
    SCOPED_TRACE(scale);
    v1::Tensor proto = ValidInt8Proto();
    std::memcpy(proto.mutable_data()->data() + sizeof(float), &scale,
                sizeof(float));
    ExpectInvalid(proto, "int8 block 1 has scale");
  }
}

TEST(ActivationCompression, RejectsOutOfRangeInt8) {
  v1::Tensor proto = ValidInt8Proto();
  (*proto.mutable_data())[2 * sizeof(float) + 5] = static_cast<char>(-128);
  ExpectInvalid(proto, "-128");
}

TEST(ActivationCompression, HostileBytesNeverCrash) {
  // Random bytes of the right size decode or fail cleanly; short ones fail.
  std::mt19937 random(5);
  for (int trial = 0; trial < 200; ++trial) {
    v1::Tensor proto = ValidInt8Proto();
    std::string* data = proto.mutable_data();
    for (char& byte : *data) byte = static_cast<char>(random());
    if (trial % 2 == 1) data->resize(random() % data->size());
    auto decoded = TensorFromProto(proto, "hidden_states");
    if (!decoded.ok()) {
      EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
    }
  }
}

TEST(ActivationCompression, ParseCompressionNames) {
  const std::vector<std::pair<std::string, v1::Compression>> names = {
      {"none", v1::COMPRESSION_NONE},
      {"fp16", v1::COMPRESSION_FLOAT16},
      {"float16", v1::COMPRESSION_FLOAT16},
      {"bf16", v1::COMPRESSION_BFLOAT16},
      {"bfloat16", v1::COMPRESSION_BFLOAT16},
      {"int8", v1::COMPRESSION_INT8_BLOCKWISE},
      {"int8_blockwise", v1::COMPRESSION_INT8_BLOCKWISE}};
  for (const auto& [name, expected] : names) {
    auto parsed = ParseCompression(name);
    ASSERT_TRUE(parsed.ok()) << name;
    EXPECT_EQ(*parsed, expected) << name;
  }

  auto unknown = ParseCompression("zstd");
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("'zstd'"), std::string::npos);
  EXPECT_NE(unknown.status().message().find("none, fp16"), std::string::npos);
}

}  // namespace
}  // namespace pollen
