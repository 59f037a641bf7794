#include "common/tensor_codec.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

namespace pollen {
namespace {

TEST(TensorCodec, RoundTripsEachDtype) {
  for (const at::ScalarType type : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor original = at::randn({2, 3, 4}).to(type);
    v1::Tensor proto;
    ASSERT_TRUE(TensorToProto(original, &proto).ok());

    auto decoded = TensorFromProto(proto, "hidden_states");
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(decoded->scalar_type(), type);
    EXPECT_EQ(decoded->sizes(), original.sizes());
    EXPECT_TRUE(at::equal(*decoded, original));
  }
}

TEST(TensorCodec, EncodesNonContiguousTensors) {
  const at::Tensor original = at::randn({4, 3}).t();
  v1::Tensor proto;
  ASSERT_TRUE(TensorToProto(original, &proto).ok());
  auto decoded = TensorFromProto(proto, "x");
  ASSERT_TRUE(decoded.ok());
  EXPECT_TRUE(at::equal(*decoded, original));
}

TEST(TensorCodec, RejectsIntegerTensors) {
  v1::Tensor proto;
  const absl::Status status = TensorToProto(at::ones({2}, at::kLong), &proto);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
}

TEST(TensorCodec, RejectsSizeMismatch) {
  v1::Tensor proto;
  proto.set_dtype(v1::DTYPE_FLOAT32);
  proto.add_shape(2);
  proto.add_shape(3);
  proto.set_data(std::string(20, '\0'));
  auto decoded = TensorFromProto(proto, "hidden_states");
  ASSERT_FALSE(decoded.ok());
  EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(decoded.status().message().find("20 data bytes"), std::string::npos)
      << decoded.status();
  EXPECT_NE(decoded.status().message().find("needs 24"), std::string::npos);
}

TEST(TensorCodec, RejectsUnknownDtype) {
  v1::Tensor proto;
  proto.set_dtype(v1::DTYPE_UNSPECIFIED);
  auto decoded = TensorFromProto(proto, "hidden_states");
  EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TensorCodec, RejectsNegativeDimension) {
  v1::Tensor proto;
  proto.set_dtype(v1::DTYPE_FLOAT32);
  proto.add_shape(-1);
  auto decoded = TensorFromProto(proto, "hidden_states");
  EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TensorCodec, RejectsOverflowingShape) {
  v1::Tensor proto;
  proto.set_dtype(v1::DTYPE_FLOAT32);
  for (int i = 0; i < 4; ++i) proto.add_shape(int64_t{1} << 20);
  auto decoded = TensorFromProto(proto, "hidden_states");
  ASSERT_FALSE(decoded.ok());
  EXPECT_NE(decoded.status().message().find("exceeds the limit"),
            std::string::npos);
}

TEST(TensorCodec, RejectsUnknownCompression) {
  v1::Tensor proto;
  proto.set_dtype(v1::DTYPE_FLOAT32);
  proto.set_compression(static_cast<v1::Compression>(7));
  auto decoded = TensorFromProto(proto, "hidden_states");
  EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pollen
