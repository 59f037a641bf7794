#include "node/quantized_linear.h"

#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

namespace pollen::node {
namespace {

// Max |a - b| as a double.
double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

TEST(ParseQuantization, AcceptsNoneAndInt8) {
  const auto none = ParseQuantization("none");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(*none, Quantization::kNone);
  const auto int8 = ParseQuantization("int8");
  ASSERT_TRUE(int8.ok()) << int8.status();
  EXPECT_EQ(*int8, Quantization::kInt8);
  EXPECT_EQ(QuantizationName(Quantization::kNone), "none");
  EXPECT_EQ(QuantizationName(Quantization::kInt8), "int8");
}

TEST(ParseQuantization, RejectsOtherNames) {
  for (const char* name : {"", "INT8", "int4", "fp8", "int8 "}) {
    const auto parsed = ParseQuantization(name);
    ASSERT_FALSE(parsed.ok()) << name;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(parsed.status().message().find(std::string("'") + name + "'"),
              absl::string_view::npos)
        << parsed.status();
    EXPECT_NE(parsed.status().message().find("none or int8"),
              absl::string_view::npos)
        << parsed.status();
  }
}

TEST(QuantizeInt8, RoundTripErrorIsAtMostHalfAScale) {
  at::manual_seed(1);
  const at::Tensor weight = at::randn({96, 200}) * at::rand({96, 1}) * 3;
  const Int8Matrix matrix = QuantizeInt8(weight);

  ASSERT_EQ(matrix.values.scalar_type(), at::kChar);
  ASSERT_EQ(matrix.values.sizes(), weight.sizes());
  ASSERT_EQ(matrix.scales.scalar_type(), at::kFloat);
  ASSERT_EQ(matrix.scales.sizes(), at::IntArrayRef({96}));
  EXPECT_LE(matrix.values.abs().max().item<int>(), 127);

  // Each row's largest magnitude maps to +-127.
  const at::Tensor expected_scales = weight.abs().amax(1) / 127;
  EXPECT_LT(MaxAbsDiff(matrix.scales, expected_scales), 1e-7);
  EXPECT_TRUE(
      at::equal(matrix.values.abs().amax(1), at::full({96}, 127, at::kChar)));

  // |W - dequantised| <= scale / 2 element-wise, plus float32 rounding.
  const at::Tensor error =
      (weight - DequantizeInt8(matrix, at::kFloat)).abs();
  const at::Tensor bound = matrix.scales.unsqueeze(1) * (0.5 + 1e-5);
  EXPECT_TRUE(at::all(error <= bound).item<bool>())
      << "max error " << error.max().item<double>();
}

TEST(QuantizeInt8, ZeroRowGetsScaleOne) {
  at::Tensor weight = at::randn({4, 8});
  weight[2].zero_();
  const Int8Matrix matrix = QuantizeInt8(weight);
  EXPECT_EQ(matrix.scales[2].item<float>(), 1.0f);
  EXPECT_EQ(matrix.values[2].abs().sum().item<int64_t>(), 0);
  EXPECT_TRUE(at::isfinite(DequantizeInt8(matrix, at::kFloat)).all().item<bool>());
}

TEST(QuantizeInt8, RejectsNonFiniteAndNonMatrix) {
  at::Tensor weight = at::randn({4, 8});
  weight[1][3] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(QuantizeInt8(weight), c10::Error);
  weight[1][3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(QuantizeInt8(weight), c10::Error);
  EXPECT_THROW(QuantizeInt8(at::randn({2, 3, 4})), c10::Error);
  EXPECT_THROW(QuantizeInt8(at::ones({2, 3}, at::kInt)), c10::Error);
}

// Several row tiles of float32 rows and a partial one.
TEST(QuantizedLinear, Int8ForwardMatchesDequantizedWeight) {
  at::manual_seed(2);
  const int64_t in = 1024;
  const int64_t rows_per_tile = QuantizedLinear::kInt8TileBytes / (in * 4);
  const int64_t out = 2 * rows_per_tile + 37;
  const at::Tensor weight = at::randn({out, in}) * 0.05;
  const QuantizedLinear layer(weight, Quantization::kInt8, at::kFloat);
  ASSERT_EQ(layer.out_features(), out);
  ASSERT_EQ(layer.in_features(), in);

  const at::Tensor x = at::randn({2, 3, in});
  const at::Tensor y = layer.Forward(x);
  ASSERT_EQ(y.sizes(), at::IntArrayRef({2, 3, out}));
  const at::Tensor expected = at::linear(x, layer.DequantizedWeight());
  EXPECT_LT(MaxAbsDiff(y, expected), 1e-4);

  // Against the original weight, the error is the quantisation error.
  const double relative = MaxAbsDiff(y, at::linear(x, weight)) /
                          at::linear(x, weight).abs().max().item<double>();
  EXPECT_LT(relative, 0.02);
}

TEST(QuantizedLinear, NoneKeepsWeightInDtype) {
  const at::Tensor weight = at::randn({5, 7});
  const QuantizedLinear layer(weight, Quantization::kNone, at::kBFloat16);
  EXPECT_EQ(layer.dtype(), at::kBFloat16);
  EXPECT_TRUE(at::equal(layer.DequantizedWeight(), weight.to(at::kBFloat16)));
  EXPECT_EQ(layer.ParameterBytes(), 5 * 7 * 2);
  const at::Tensor x = at::randn({3, 7}).to(at::kBFloat16);
  EXPECT_TRUE(at::equal(layer.Forward(x),
                        at::linear(x, weight.to(at::kBFloat16))));
}

TEST(QuantizedLinear, Int8ParameterBytesCountValuesAndScales) {
  const QuantizedLinear layer(at::randn({48, 80}), Quantization::kInt8,
                              at::kFloat);
  EXPECT_EQ(layer.ParameterBytes(), 48 * 80 + 48 * 4);
}

TEST(QuantizedLinear, Int8ComputesInBfloat16) {
  at::manual_seed(3);
  const at::Tensor weight = at::randn({64, 96}) * 0.1;
  const QuantizedLinear float_layer(weight, Quantization::kInt8, at::kFloat);
  const QuantizedLinear bf16_layer(weight, Quantization::kInt8, at::kBFloat16);
  const at::Tensor x = at::randn({4, 96});

  const at::Tensor y = bf16_layer.Forward(x.to(at::kBFloat16));
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  const at::Tensor expected = float_layer.Forward(x);
  EXPECT_LT(MaxAbsDiff(y, expected) / expected.abs().max().item<double>(),
            0.02);
}

TEST(QuantizedLinear, RejectsWrongInputWidthAndDtype) {
  const QuantizedLinear layer(at::randn({8, 16}), Quantization::kInt8,
                              at::kFloat);
  EXPECT_THROW(layer.Forward(at::randn({2, 15})), c10::Error);
  EXPECT_THROW(layer.Forward(at::randn({2, 16}).to(at::kBFloat16)),
               c10::Error);
}

// The input gradient uses the dequantised weight, tile by tile, and the
// weight gets none.
TEST(QuantizedLinear, Int8BackwardUsesDequantizedWeight) {
  at::manual_seed(4);
  const int64_t in = 2048;
  const int64_t out = QuantizedLinear::kInt8TileBytes / (in * 4) + 100;
  const QuantizedLinear layer(at::randn({out, in}) * 0.02, Quantization::kInt8,
                              at::kFloat);
  const at::Tensor dequantized = layer.DequantizedWeight();

  const at::Tensor x = at::randn({2, 3, in}).requires_grad_(true);
  const at::Tensor grad_y = at::randn({2, 3, out});
  layer.Forward(x).backward(grad_y);
  ASSERT_TRUE(x.grad().defined());

  const at::Tensor x_reference = x.detach().clone().requires_grad_(true);
  at::linear(x_reference, dequantized).backward(grad_y);
  EXPECT_LT(MaxAbsDiff(x.grad(), x_reference.grad()), 1e-4);
}

TEST(QuantizedLinear, Int8WithoutGradModeRecordsNoGraph) {
  const QuantizedLinear layer(at::randn({8, 16}), Quantization::kInt8,
                              at::kFloat);
  const at::Tensor x = at::randn({2, 16}).requires_grad_(true);
  at::NoGradGuard no_grad;
  EXPECT_FALSE(layer.Forward(x).requires_grad());
}

}  // namespace
}  // namespace pollen::node
