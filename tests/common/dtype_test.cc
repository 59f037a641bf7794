#include "common/dtype.h"

#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

namespace pollen {
namespace {

TEST(ParseDtype, AcceptsNamesAndShortNames) {
  const std::vector<std::pair<std::string, at::ScalarType>> cases = {
      {"float32", at::kFloat},   {"fp32", at::kFloat},
      {"float16", at::kHalf},    {"fp16", at::kHalf},
      {"bfloat16", at::kBFloat16}, {"bf16", at::kBFloat16}};
  for (const auto& [name, expected] : cases) {
    const auto parsed = ParseDtype(name);
    ASSERT_TRUE(parsed.ok()) << name << ": " << parsed.status();
    EXPECT_EQ(*parsed, expected) << name;
  }
}

TEST(ParseDtype, RejectsOtherNames) {
  for (const char* name : {"", "float64", "FP32", "int8", "bfloat"}) {
    const auto parsed = ParseDtype(name);
    ASSERT_FALSE(parsed.ok()) << name;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(parsed.status().message().find(std::string("'") + name + "'"),
              absl::string_view::npos)
        << parsed.status();
  }
}

TEST(DtypeName, NamesRoundTrip) {
  for (const at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const auto parsed = ParseDtype(DtypeName(dtype));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, dtype);
  }
}

}  // namespace
}  // namespace pollen
