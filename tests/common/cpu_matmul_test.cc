#include "common/cpu_matmul.h"

#include <cmath>

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


// Every tile of rows (8 and 4 at a time, the remainders, the wide tiles of
// a lone row) and output counts below, at and past the column alignment.
TEST(MatMulTransposed, MatchesLibtorchForEveryRowCount) {
  at::manual_seed(13);
  for (int64_t in : {3, 64, 203}) {
    for (int64_t out : {1, 6, 37, 64, 130, 344}) {
      const at::Tensor w = at::randn({out, in});
      const TransposedWeight transposed = TransposeForMatMul(w);
      ASSERT_EQ(transposed.stride % kTransposedAlignment, 0);
      for (int64_t rows = 1; rows <= kLoopMatMulMaxRows + 2; ++rows) {
        const at::Tensor x = at::randn({rows, in});
        at::Tensor got = at::full({rows, out}, std::nanf(""));
        MatMulTransposed(x.data_ptr<float>(), rows, transposed,
                         got.data_ptr<float>());
        const at::Tensor want = at::mm(x, w.t());
        ASSERT_TRUE(at::allclose(got, want, 1e-4, 1e-4))
            << "rows " << rows << ", in " << in << ", out " << out
            << ", largest difference " << (got - want).abs().max().item<float>();
      }
    }
  }
}

TEST(MatMulTransposed, RowsInABatchEqualRowsAlone) {
  at::manual_seed(17);
  const at::Tensor w = at::randn({344, 64});
  const TransposedWeight transposed = TransposeForMatMul(w);
  const at::Tensor x = at::randn({kLoopMatMulMaxRows, 64});
  at::Tensor batched = at::empty({kLoopMatMulMaxRows, 344});
  MatMulTransposed(x.data_ptr<float>(), kLoopMatMulMaxRows, transposed,
                   batched.data_ptr<float>());
  for (int64_t r = 0; r < x.size(0); ++r) {
    at::Tensor alone = at::empty({1, 344});
    MatMulTransposed(x[r].data_ptr<float>(), 1, transposed,
                     alone.data_ptr<float>());
    ASSERT_TRUE(at::equal(batched.narrow(0, r, 1), alone)) << "row " << r;
  }
}

TEST(MatMulTransposed, RejectsOtherTensors) {
  EXPECT_THROW(TransposeForMatMul(at::randn({4, 4}, at::kDouble)), c10::Error);
  EXPECT_THROW(TransposeForMatMul(at::randn({4})), c10::Error);
}

}  // namespace
}  // namespace pollen
