#include "node/quantized_linear.h"

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "absl/strings/str_cat.h"

namespace pollen::node {
namespace {

// Rows of an int8 matrix with `in_features` columns converted to `dtype`
// at a time.
int64_t TileRows(int64_t in_features, at::ScalarType dtype) {
  const int64_t row_bytes = std::max<int64_t>(1, in_features) *
                            static_cast<int64_t>(c10::elementSize(dtype));
  return std::max<int64_t>(1, QuantizedLinear::kInt8TileBytes / row_bytes);
}

// Rows [row, row + rows) of the int8 matrix as weights in `dtype`: the
// values alone when `scaled` is false, values * scales when it is true.
at::Tensor DequantizeTile(const at::Tensor& values, const at::Tensor& scales,
                          int64_t row, int64_t rows, at::ScalarType dtype,
                          bool scaled) {
  at::Tensor tile = values.narrow(0, row, rows).to(dtype);
  if (scaled) tile.mul_(scales.narrow(0, row, rows).to(dtype).unsqueeze(1));
  return tile;
}

// x [..., in] -> [..., out] = x (values * scales[:, None])^T in x's dtype,
// one tile of rows at a time. An int8 value is exact in every float dtype,
// so x is multiplied by the unscaled values and the scales are applied to
// the output columns, which costs less than scaling the tile. float16 is
// the exception: unscaled sums of up to in * 127 |x| could overflow its
// range of 65504, so its tiles are scaled first.
// NOTE: float16 blocks run only off the CPU, and that path has not run on a
// GPU yet.
at::Tensor Int8MatMul(const at::Tensor& x, const at::Tensor& values,
                      const at::Tensor& scales) {
  const at::ScalarType dtype = x.scalar_type();
  const bool scale_weights = dtype == at::kHalf;
  const int64_t out = values.size(0);
  const int64_t rows = TileRows(values.size(1), dtype);

  std::vector<at::Tensor> parts;
  parts.reserve((out + rows - 1) / rows);
  for (int64_t row = 0; row < out; row += rows) {
    const int64_t count = std::min(rows, out - row);
    const at::Tensor tile =
        DequantizeTile(values, scales, row, count, dtype, scale_weights);
    at::Tensor part = at::linear(x, tile);
    if (!scale_weights) part.mul_(scales.narrow(0, row, count).to(dtype));
    parts.push_back(std::move(part));
  }
  return parts.size() == 1 ? parts.front() : at::cat(parts, -1);
}

// grad_y [..., out] -> grad_x [..., in] = grad_y (values * scales[:, None]),
// accumulated over the same tiles of rows as Int8MatMul.
at::Tensor Int8MatMulTransposed(const at::Tensor& grad_y,
                                const at::Tensor& values,
                                const at::Tensor& scales) {
  const at::ScalarType dtype = grad_y.scalar_type();
  const int64_t out = values.size(0);
  const int64_t rows = TileRows(values.size(1), dtype);

  at::Tensor grad_x;
  for (int64_t row = 0; row < out; row += rows) {
    const int64_t count = std::min(rows, out - row);
    const at::Tensor tile =
        DequantizeTile(values, scales, row, count, dtype, /*scaled=*/true);
    const at::Tensor part = at::matmul(grad_y.narrow(-1, row, count), tile);
    grad_x = grad_x.defined() ? grad_x.add_(part) : part;
  }
  return grad_x;
}

// Autograd node of an int8 linear layer. Saves the int8 matrix, which the
// layer keeps anyway, rather than a dequantised copy, so training through a
// quantised block costs no more weight memory than inference.
class Int8LinearFunction
    : public torch::autograd::Function<Int8LinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* context,
                            const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& scales) {
    context->saved_data["values"] = values;
    context->saved_data["scales"] = scales;
    return Int8MatMul(x, values, scales);
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* context,
      torch::autograd::variable_list grad_outputs) {
    const at::Tensor values = context->saved_data["values"].toTensor();
    const at::Tensor scales = context->saved_data["scales"].toTensor();
    return {Int8MatMulTransposed(grad_outputs[0], values, scales),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

absl::StatusOr<Quantization> ParseQuantization(const std::string& name) {
  if (name == "none") return Quantization::kNone;
  if (name == "int8") return Quantization::kInt8;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown quantization '", name, "'; use none or int8"));
}

std::string QuantizationName(Quantization quantization) {
  return quantization == Quantization::kInt8 ? "int8" : "none";
}

Int8Matrix QuantizeInt8(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && at::isFloatingType(weight.scalar_type()),
              "int8 quantization takes a 2-D float matrix, got ",
              weight.scalar_type(), " of shape ", weight.sizes());
  const at::Tensor w = weight.to(at::kFloat);
  TORCH_CHECK(at::isfinite(w).all().item<bool>(),
              "int8 quantization of a matrix of shape ", weight.sizes(),
              " found a value that is not finite");

  // Zero rows would divide by zero; any scale quantises them to 0.
  at::Tensor scales = w.abs().amax(/*dim=*/1) / 127.0;
  scales.masked_fill_(scales == 0, 1.0);
  const at::Tensor values =
      at::round(w / scales.unsqueeze(1)).clamp_(-127, 127).to(at::kChar);
  return Int8Matrix{values, scales};
}

at::Tensor DequantizeInt8(const Int8Matrix& matrix, at::ScalarType dtype) {
  return (matrix.values.to(at::kFloat) * matrix.scales.unsqueeze(1)).to(dtype);
}

QuantizedLinear::QuantizedLinear(const at::Tensor& weight,
                                 Quantization quantization,
                                 at::ScalarType dtype)
    : quantization_(quantization), dtype_(dtype) {
  TORCH_CHECK(weight.dim() == 2 && at::isFloatingType(weight.scalar_type()),
              "a linear layer takes a 2-D float weight, got ",
              weight.scalar_type(), " of shape ", weight.sizes());
  if (quantization == Quantization::kInt8) {
    Int8Matrix matrix = QuantizeInt8(weight);
    weight_ = std::move(matrix.values);
    scales_ = std::move(matrix.scales);
  } else {
    weight_ = weight.to(dtype).contiguous();
  }
}

at::Tensor QuantizedLinear::Forward(const at::Tensor& x) const {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features() &&
                  x.scalar_type() == dtype_,
              "linear layer [", out_features(), ", ", in_features(),
              "] takes [..., ", in_features(), "] in ", dtype_, ", got ",
              x.sizes(), " in ", x.scalar_type());
  if (quantization_ == Quantization::kNone) return at::linear(x, weight_);
  if (at::GradMode::is_enabled() && x.requires_grad()) {
    return Int8LinearFunction::apply(x, weight_, scales_);
  }
  return Int8MatMul(x, weight_, scales_);
}

at::Tensor QuantizedLinear::DequantizedWeight() const {
  if (quantization_ == Quantization::kNone) return weight_;
  return DequantizeInt8(Int8Matrix{weight_, scales_}, dtype_);
}

int64_t QuantizedLinear::ParameterBytes() const {
  int64_t bytes = static_cast<int64_t>(weight_.nbytes());
  if (scales_.defined()) bytes += static_cast<int64_t>(scales_.nbytes());
  return bytes;
}

}  // namespace pollen::node
