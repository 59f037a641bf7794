// Eight floats as one GCC vector, for the CPU loops of common/ and node/.
// With AVX a Float8 is one 256-bit register, and without it two SSE ones.
// The helpers are inline and always inlined, so they take the instruction
// set of the function that calls them.
#pragma once

namespace pollen {

typedef float Float8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline Float8 Load8(const float* p) {
  Float8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void Store8(Float8 v, float* p) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// Returns a Float8 with every lane equal to `value`.
__attribute__((always_inline)) inline Float8 Splat(float value) {
  return Float8{} + value;
}

// Returns the sum of the eight lanes, added pairwise.
__attribute__((always_inline)) inline float Sum8(Float8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

}  // namespace pollen
