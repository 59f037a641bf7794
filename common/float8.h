// Eight floats as one GCC vector, for the CPU loops of common/ and node/.
// With AVX a Float8 is one 256-bit register, and without it two SSE ones.
// The helpers are inline and always inlined, so they take the instruction
// set of the function that calls them.
#pragma once

#include <cstdint>

namespace pollen {

typedef float Float8 __attribute__((vector_size(32)));

// Eight ints, the lanes of a Float8 as integers.
typedef int32_t Int8 __attribute__((vector_size(32)));

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

// Returns the eight sums of the lanes of v[0..7]: lane k is v[k]'s sum.
// Three rounds of shuffles and additions, instead of a separate reduction
// of each vector. Each sum adds the lanes in the order of Sum8, so the
// results are the same.
__attribute__((always_inline)) inline Float8 TransposedSums(const Float8* v) {
  const Int8 even = {0, 8, 2, 10, 4, 12, 6, 14};
  const Int8 odd = {1, 9, 3, 11, 5, 13, 7, 15};
  const Int8 low_pairs = {0, 1, 8, 9, 4, 5, 12, 13};
  const Int8 high_pairs = {2, 3, 10, 11, 6, 7, 14, 15};
  const Int8 low_half = {0, 1, 2, 3, 8, 9, 10, 11};
  const Int8 high_half = {4, 5, 6, 7, 12, 13, 14, 15};

  // Sums of adjacent lanes: pairs[i] contains those of v[2i] and
  // v[2i + 1], interleaved.
  Float8 pairs[4];
  for (int i = 0; i < 4; ++i) {
    pairs[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], even) +
               __builtin_shuffle(v[2 * i], v[2 * i + 1], odd);
  }
  // Sums of four lanes: each 128-bit half contains one sum per vector.
  const Float8 quads_low = __builtin_shuffle(pairs[0], pairs[1], low_pairs) +
                           __builtin_shuffle(pairs[0], pairs[1], high_pairs);
  const Float8 quads_high = __builtin_shuffle(pairs[2], pairs[3], low_pairs) +
                            __builtin_shuffle(pairs[2], pairs[3], high_pairs);
  // Adding the halves completes the sums, in the order of v.
  return __builtin_shuffle(quads_low, quads_high, low_half) +
         __builtin_shuffle(quads_low, quads_high, high_half);
}

}  // namespace pollen
