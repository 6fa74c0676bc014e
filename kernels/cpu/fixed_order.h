// Float sums in one order on every machine, so that x86 and arm64 builds of the kernels give the same bits.
// `#pragma omp simd reduction` sums in the target's vector width (16 lanes with AVX-512, 4 with NEON): the
// two builds rounded differently, and an int8 rounding downstream (the KV cache, XNNPACK's dynamic
// activations) turned a last-bit difference into a whole step (results/arm64.md). With -ffp-contract=off
// (CMakeLists.txt: no fused multiply-add either) the arithmetic is then the same IEEE operations in the same order.
#pragma once

#include <cstdint>
#include <cstring>

namespace spinquant {

// Eight floats in GCC/Clang's generic vector extension (one AVX2 register, two NEON ones).
typedef float Floats8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline Floats8 load8(const float* p) {
  Floats8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float sum8(Floats8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Σ x[d]·y[d]: eight lanes, then the lanes pairwise, then the tail in sequence.
inline float dot_in_fixed_order(const float* x, const float* y, int64_t n) {
  Floats8 sums = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) sums += load8(x + d) * load8(y + d);
  float sum = sum8(sums);
  for (; d < n; ++d) sum += x[d] * y[d];
  return sum;
}

// Σ x[d], in the same order.
inline float sum_in_fixed_order(const float* x, int64_t n) {
  Floats8 sums = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) sums += load8(x + d);
  float sum = sum8(sums);
  for (; d < n; ++d) sum += x[d];
  return sum;
}

}  // namespace spinquant
