// Hidden states to and from the wire format (common/tensor_codec.h), at a
// decode step's and a prefill chunk's size for a 2048-wide model.
#include <benchmark/benchmark.h>

#include <ATen/ATen.h>

#include "common/tensor_codec.h"

namespace pollen {
namespace {

// state.range(0): tokens of [1, tokens, 2048] float32 hidden states.
at::Tensor HiddenStates(const benchmark::State& state) {
  return at::randn({1, state.range(0), 2048});
}

void BM_TensorToProto(benchmark::State& state) {
  const at::Tensor hidden = HiddenStates(state);
  for (auto _ : state) {
    v1::Tensor proto;
    benchmark::DoNotOptimize(TensorToProto(hidden, &proto));
  }
  state.SetBytesProcessed(state.iterations() * hidden.nbytes());
}
BENCHMARK(BM_TensorToProto)->Arg(1)->Arg(128);

void BM_TensorFromProto(benchmark::State& state) {
  const at::Tensor hidden = HiddenStates(state);
  v1::Tensor proto;
  if (!TensorToProto(hidden, &proto).ok()) {
    state.SkipWithError("TensorToProto failed");
    return;
  }
  for (auto _ : state) {
    benchmark::DoNotOptimize(TensorFromProto(proto, "hidden states"));
  }
  state.SetBytesProcessed(state.iterations() * hidden.nbytes());
}
BENCHMARK(BM_TensorFromProto)->Arg(1)->Arg(128);

// Serialized bytes, as gRPC sends them.
void BM_TensorProtoSerialize(benchmark::State& state) {
  const at::Tensor hidden = HiddenStates(state);
  v1::Tensor proto;
  if (!TensorToProto(hidden, &proto).ok()) {
    state.SkipWithError("TensorToProto failed");
    return;
  }
  std::string bytes;
  for (auto _ : state) {
    proto.SerializeToString(&bytes);
    benchmark::DoNotOptimize(bytes.data());
  }
  state.SetBytesProcessed(state.iterations() * hidden.nbytes());
}
BENCHMARK(BM_TensorProtoSerialize)->Arg(1)->Arg(128);

}  // namespace
}  // namespace pollen
