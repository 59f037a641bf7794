#include "common/safetensors.h"

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "tests/support/test_support.h"

namespace pollen {
namespace {

using ::pollen::testing::TempDir;

// Writes an 8-byte header length, `header` and `data` as a file.
std::string WriteRaw(const TempDir& dir, const std::string& header,
                     const std::string& data = "",
                     uint64_t header_length = UINT64_MAX) {
  const std::string path = dir.path() + "/raw.safetensors";
  const uint64_t length =
      header_length == UINT64_MAX ? header.size() : header_length;
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(&length), sizeof(length));
  file << header << data;
  return path;
}

// Returns the error of opening `path`, or OK.
absl::Status OpenError(const std::string& path) {
  return SafetensorsFile::Open(path).status();
}

TEST(Safetensors, RoundTripEachDtype) {
  TempDir dir;
  const at::Tensor f32 = at::randn({3, 5});
  const at::Tensor f16 = at::randn({2, 2, 3}).to(at::kHalf);
  const at::Tensor bf16 = at::randn({7}).to(at::kBFloat16);
  const at::Tensor scalar = at::full({}, 2.5f);
  const std::string path = dir.path() + "/round_trip.safetensors";
  ASSERT_TRUE(WriteSafetensors(path,
                               {{"w.f32", f32},
                                {"w.f16", f16},
                                {"w.bf16", bf16},
                                {"scalar", scalar}},
                               {{"format", "pt"}})
                  .ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path);
  EXPECT_EQ((*file)->TensorNames(),
            (std::vector<std::string>{"scalar", "w.bf16", "w.f16", "w.f32"}));
  EXPECT_EQ((*file)->metadata().at("format"), "pt");

  const SafetensorsEntry* entry = (*file)->Find("w.f16");
  ASSERT_NE(entry, nullptr);
  EXPECT_EQ(entry->dtype, SafetensorsDtype::kF16);
  EXPECT_EQ(entry->shape, (std::vector<int64_t>{2, 2, 3}));
  EXPECT_EQ(entry->end - entry->begin, 24u);
  EXPECT_EQ((*file)->Find("absent"), nullptr);

  for (const auto& [name, expected] :
       std::vector<std::pair<std::string, at::Tensor>>{{"w.f32", f32},
                                                       {"w.f16", f16},
                                                       {"w.bf16", bf16},
                                                       {"scalar", scalar}}) {
    auto tensor = (*file)->Get(name);
    ASSERT_TRUE(tensor.ok()) << tensor.status();
    EXPECT_EQ(tensor->scalar_type(), expected.scalar_type()) << name;
    EXPECT_EQ(tensor->sizes(), expected.sizes()) << name;
    EXPECT_TRUE(at::equal(*tensor, expected)) << name;
  }
}

TEST(Safetensors, GetIsZeroCopyView) {
  TempDir dir;
  const std::string path = dir.path() + "/view.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"x", at::arange(16, at::kFloat)}}).ok());

  at::Tensor first;
  at::Tensor second;
  {
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    first = *(*file)->Get("x");
    second = *(*file)->Get("x");
  }
  // The file object is gone; the views still read the mapping.
  EXPECT_EQ(first.data_ptr(), second.data_ptr());
  EXPECT_TRUE(at::equal(first, at::arange(16, at::kFloat)));
}

TEST(Safetensors, EmptyTensorRoundTrip) {
  TempDir dir;
  const std::string path = dir.path() + "/empty.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"empty", at::zeros({0, 4})}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto tensor = (*file)->Get("empty");
  ASSERT_TRUE(tensor.ok()) << tensor.status();
  EXPECT_EQ(tensor->sizes(), (at::IntArrayRef{0, 4}));
}

TEST(Safetensors, GetMissingTensor) {
  TempDir dir;
  const std::string path = dir.path() + "/one.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"x", at::ones({2})}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const absl::Status status = (*file)->Get("y").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find("'y'"), absl::string_view::npos) << status;
}

TEST(Safetensors, MissingFile) {
  TempDir dir;
  const absl::Status status = OpenError(dir.path() + "/absent.safetensors");
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(status.message().find("absent.safetensors"),
            absl::string_view::npos)
      << status;
}

TEST(Safetensors, TruncatedFile) {
  TempDir dir;
  const std::string path = dir.path() + "/short.safetensors";
  std::ofstream(path, std::ios::binary) << "abc";
  const absl::Status status = OpenError(path);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("3 bytes"), absl::string_view::npos)
      << status;
}

TEST(Safetensors, HeaderLengthBeyondFile) {
  TempDir dir;
  const absl::Status status =
      OpenError(WriteRaw(dir, "{}", "", /*header_length=*/1000));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("header length 1000"),
            absl::string_view::npos)
      << status;
}

TEST(Safetensors, HeaderNotJson) {
  TempDir dir;
  const absl::Status status = OpenError(WriteRaw(dir, "{\"x\": [1, 2"));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("not valid JSON"), absl::string_view::npos)
      << status;
}

TEST(Safetensors, HeaderNotObject) {
  TempDir dir;
  const absl::Status status = OpenError(WriteRaw(dir, "[1, 2]"));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("JSON object"), absl::string_view::npos)
      << status;
}

TEST(Safetensors, EntryMissingFields) {
  TempDir dir;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"x": {"shape": [2], "data_offsets": [0, 8]}})", "dtype"},
      {R"({"x": {"dtype": "F32", "data_offsets": [0, 8]}})", "shape"},
      {R"({"x": {"dtype": "F32", "shape": [2]}})", "data_offsets"},
      {R"({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})",
       "invalid shape"},
      {R"({"x": 3})", "object"},
  };
  for (const auto& [header, expected] : cases) {
    const absl::Status status =
        OpenError(WriteRaw(dir, header, std::string(8, '\0')));
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << header;
    EXPECT_NE(status.message().find(expected), absl::string_view::npos)
        << status;
    EXPECT_NE(status.message().find("'x'"), absl::string_view::npos)
        << status;
  }
}

TEST(Safetensors, OffsetsOutOfRange) {
  TempDir dir;
  const absl::Status status = OpenError(WriteRaw(
      dir, R"({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
      std::string(8, '\0')));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("[0, 16) exceed the data section of 8 bytes"),
            absl::string_view::npos)
      << status;
}

TEST(Safetensors, BeginAfterEnd) {
  TempDir dir;
  const absl::Status status = OpenError(WriteRaw(
      dir, R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})",
      std::string(8, '\0')));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("begin > end"), absl::string_view::npos)
      << status;
}

TEST(Safetensors, SizeMismatch) {
  TempDir dir;
  const absl::Status status = OpenError(WriteRaw(
      dir, R"({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})",
      std::string(8, '\0')));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("span 8 bytes"), absl::string_view::npos)
      << status;
  EXPECT_NE(status.message().find("needs 12"), absl::string_view::npos)
      << status;
}

TEST(Safetensors, ElementCountOverflow) {
  TempDir dir;
  const absl::Status status = OpenError(WriteRaw(
      dir,
      R"({"x": {"dtype": "F32", "shape": [4294967296, 4294967296],)"
      R"( "data_offsets": [0, 0]}})"));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("overflows"), absl::string_view::npos)
      << status;
}

TEST(Safetensors, UnsupportedDtype) {
  TempDir dir;
  const absl::Status status = OpenError(WriteRaw(
      dir, R"({"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})",
      std::string(8, '\0')));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("dtype I64"), absl::string_view::npos)
      << status;
}

TEST(Safetensors, MetadataMustBeStrings) {
  TempDir dir;
  const absl::Status status =
      OpenError(WriteRaw(dir, R"({"__metadata__": {"n": 1}})"));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("__metadata__"), absl::string_view::npos)
      << status;
}

TEST(Safetensors, WriteRejectsIntegerTensor) {
  TempDir dir;
  const absl::Status status = WriteSafetensors(
      dir.path() + "/int.safetensors", {{"ids", at::arange(3, at::kLong)}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("'ids'"), absl::string_view::npos) << status;
}

TEST(Safetensors, WriteRejectsRepeatedName) {
  TempDir dir;
  const absl::Status status =
      WriteSafetensors(dir.path() + "/twice.safetensors",
                       {{"x", at::ones({1})}, {"x", at::zeros({1})}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
}

TEST(Safetensors, WriteNonContiguous) {
  TempDir dir;
  const std::string path = dir.path() + "/transposed.safetensors";
  const at::Tensor transposed = at::randn({3, 4}).t();
  ASSERT_TRUE(WriteSafetensors(path, {{"t", transposed}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE(at::equal(*(*file)->Get("t"), transposed));
}

TEST(Safetensors, ReadsStories260k) {
  auto file = SafetensorsFile::Open(pollen::testing::Stories260kDir() +
                                    "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->TensorNames().size(), 47u);
  const SafetensorsEntry* entry = (*file)->Find("model.embed_tokens.weight");
  ASSERT_NE(entry, nullptr);
  EXPECT_EQ(entry->shape, (std::vector<int64_t>{512, 64}));
}

}  // namespace
}  // namespace pollen
