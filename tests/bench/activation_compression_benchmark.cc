// Encode plus decode of float32 hidden states [1, tokens, 2048] with each
// pollen.v1.Compression, through TensorToProto and TensorFromProto: the
// CPU time a lossy encoding adds to one hop, against the bytes it saves.
#include <benchmark/benchmark.h>

#include <ATen/ATen.h>

#include "common/activation_compression.h"
#include "common/tensor_codec.h"

namespace pollen {
namespace {

// state.range(0): tokens; state.range(1): the v1::Compression value.
void BM_CompressionRoundTrip(benchmark::State& state) {
  const at::Tensor hidden = at::randn({1, state.range(0), 2048});
  const auto compression = static_cast<v1::Compression>(state.range(1));
  state.SetLabel(CompressionName(compression));

  // The message is reused, as HopStream and the node reuse theirs.
  v1::Tensor proto;
  for (auto _ : state) {
    if (!TensorToProto(hidden, &proto, compression).ok()) {
      state.SkipWithError("TensorToProto failed");
      return;
    }
    auto decoded = TensorFromProto(proto, "hidden states");
    if (!decoded.ok()) {
      state.SkipWithError("TensorFromProto failed");
      return;
    }
    benchmark::DoNotOptimize(decoded->data_ptr());
  }
  state.SetBytesProcessed(state.iterations() * hidden.nbytes());
  state.counters["wire_bytes"] = static_cast<double>(proto.data().size());
}
BENCHMARK(BM_CompressionRoundTrip)
    ->ArgsProduct({{1, 512},
                   {v1::COMPRESSION_NONE, v1::COMPRESSION_FLOAT16,
                    v1::COMPRESSION_BFLOAT16,
                    v1::COMPRESSION_INT8_BLOCKWISE}});

}  // namespace
}  // namespace pollen
