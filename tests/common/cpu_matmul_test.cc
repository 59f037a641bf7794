#include "common/cpu_matmul.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

namespace pollen {
namespace {

// Rows of every tile size and remainder, widths with and without a tail
// past the last 8 floats, output counts with and without a tail past the
// last 4 features.
TEST(MatMul, MatchesLibtorchForEveryRowCount) {
  at::manual_seed(7);
  for (int64_t in : {3, 64, 203}) {
    for (int64_t out : {1, 6, 64}) {
      const at::Tensor w = at::randn({out, in});
      for (int64_t rows = 1; rows <= kLoopMatMulMaxRows + 2; ++rows) {
        const at::Tensor x = at::randn({rows, in});
        const at::Tensor got = LinearFewRows(x, w);
        const at::Tensor want = at::mm(x, w.t());
        ASSERT_TRUE(at::allclose(got, want, 1e-4, 1e-4))
            << "rows " << rows << ", in " << in << ", out " << out
            << ", largest difference " << (got - want).abs().max().item<float>();
      }
    }
  }
}

// A row's output must not depend on the rows beside it, so that batched
// decode steps give the same tokens as steps run alone.
TEST(MatMul, RowsInABatchEqualRowsAlone) {
  at::manual_seed(11);
  const at::Tensor w = at::randn({37, 2048});
  const at::Tensor x = at::randn({kLoopMatMulMaxRows, 2048});
  const at::Tensor batched = LinearFewRows(x, w);
  for (int64_t r = 0; r < x.size(0); ++r) {
    const at::Tensor alone = LinearFewRows(x.narrow(0, r, 1), w);
    ASSERT_TRUE(at::equal(batched.narrow(0, r, 1), alone)) << "row " << r;
  }
}

TEST(MatMul, KeepsLeadingDimensions) {
  const at::Tensor x = at::randn({2, 3, 16});
  const at::Tensor w = at::randn({5, 16});
  const at::Tensor y = LinearFewRows(x, w);
  EXPECT_EQ(y.sizes(), (at::IntArrayRef{2, 3, 5}));
  EXPECT_TRUE(at::allclose(y, at::linear(x, w), 1e-4, 1e-4));
}

}  // namespace
}  // namespace pollen
