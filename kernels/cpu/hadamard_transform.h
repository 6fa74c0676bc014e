// y = x @ H_n over contiguous rows, H_n = (H_K ⊗ S_{2^m}) / √n: the same matrix as
// spinquant.hadamard.hadamard_matrix(n). Plain C++17 with no ExecuTorch dependency, so the
// ExecuTorch kernel, the C++ test and the benchmark share it. Hot loops are plain loops over
// contiguous memory that the compiler vectorizes, except where lanes of one vector mix: there
// GCC/Clang generic vectors say it directly (no intrinsics, so x86 and arm64 share the code).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>

#include "hadamard_tables.h"

namespace spinquant {

struct HadamardSize {
  int64_t n = 0;
  int k = 1;              // order of the dense factor H_K
  int64_t m = 1;          // 2^m, order of the Sylvester factor
  const char* signs = nullptr;  // H_K row-major as '+'/'-', null for K = 1
};

// n = K·2^m with the smallest supported K, the choice spinquant.hadamard.factor_size makes
// (n = 40·2^m is also 20·2^(m+1), and both sides must pick the same table).
inline bool factor_size(int64_t n, HadamardSize* size) {
  auto pow2 = [](int64_t v) { return v > 0 && (v & (v - 1)) == 0; };
  if (pow2(n)) {
    *size = HadamardSize{n, 1, n, nullptr};
    return true;
  }
  for (const HadamardTable& t : kHadamardTables) {
    if (n % t.k == 0 && pow2(n / t.k)) {
      *size = HadamardSize{n, t.k, n / t.k, t.signs};
      return true;
    }
  }
  return false;
}

namespace detail {

// A 32-byte vector (one AVX2 register, two NEON registers) in GCC/Clang's generic vector
// extension: the shortest stages mix lanes within a vector, which plain loops did not vectorize
// (measured 0.5 ns/element against 0.13 for one shuffle and one multiply-add per stage).
template <typename C>
struct Vec {
  typedef C type __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / sizeof(C);
};

// Stage h within a vector: lane j becomes x[j ^ h] ± x[j], minus where bit h of j is set.
template <typename C, int H, int... J>
inline typename Vec<C>::type lane_stage(typename Vec<C>::type x, std::integer_sequence<int, J...>) {
  const typename Vec<C>::type sign{((J & H) ? C(-1) : C(1))...};
  return __builtin_shufflevector(x, x, (J ^ H)...) + x * sign;
}

template <typename C, int H = 1>
inline typename Vec<C>::type lane_stages(typename Vec<C>::type x) {
  if constexpr (H < Vec<C>::kLanes) {
    return lane_stages<C, 2 * H>(lane_stage<C, H>(x, std::make_integer_sequence<int, Vec<C>::kLanes>{}));
  } else {
    return x;
  }
}

// dst ← src·scale with every stage shorter than G vectors applied (m a multiple of G·kLanes):
// the copy, the scale, the lane-mixing stages and G's stages across vectors in one pass, the G
// vectors held in registers. src may equal dst.
template <typename C, int G>
inline void first_pass(const C* src, C* dst, int64_t m, C scale) {
  using V = typename Vec<C>::type;
  constexpr int64_t span = G * Vec<C>::kLanes;
  for (int64_t i = 0; i < m; i += span) {
    V x[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      std::memcpy(&x[g], src + i + g * Vec<C>::kLanes, sizeof(V));
      x[g] = lane_stages<C>(x[g]) * scale;
    }
#pragma GCC unroll 8
    for (int h = 1; h < G; h *= 2) {
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        if (g & h) continue;
        const V a = x[g], b = x[g + h];
        x[g] = a + b, x[g + h] = a - b;
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) std::memcpy(dst + i + g * Vec<C>::kLanes, &x[g], sizeof(V));
  }
}

// Stages h, 2h and 4h in one pass over memory; the inner loop is contiguous. `omp simd` (with
// -fopenmp-simd) tells the compiler the eight streams never overlap: it gives up checking that
// many pairs at run time and would not vectorize the loop otherwise.
template <typename C>
inline void radix8_stage(C* v, int64_t m, int64_t h) {
  for (int64_t i = 0; i < m; i += 8 * h) {
    C* p = v + i;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      C* q = p + j;
      const C x0 = q[0], x1 = q[h], x2 = q[2 * h], x3 = q[3 * h];
      const C x4 = q[4 * h], x5 = q[5 * h], x6 = q[6 * h], x7 = q[7 * h];
      const C a0 = x0 + x1, a1 = x0 - x1, a2 = x2 + x3, a3 = x2 - x3;
      const C a4 = x4 + x5, a5 = x4 - x5, a6 = x6 + x7, a7 = x6 - x7;
      const C b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
      const C b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
      q[0] = b0 + b4, q[h] = b1 + b5, q[2 * h] = b2 + b6, q[3 * h] = b3 + b7;
      q[4 * h] = b0 - b4, q[5 * h] = b1 - b5, q[6 * h] = b2 - b6, q[7 * h] = b3 - b7;
    }
  }
}

template <typename C>
inline void radix4_stage(C* v, int64_t m, int64_t h) {
  for (int64_t i = 0; i < m; i += 4 * h) {
    C* p = v + i;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const C a = p[j], b = p[j + h], c = p[j + 2 * h], d = p[j + 3 * h];
      const C s = a + b, t = a - b, u = c + d, w = c - d;
      p[j] = s + u, p[j + h] = t + w, p[j + 2 * h] = s - u, p[j + 3 * h] = t - w;
    }
  }
}

template <typename C>
inline void radix2_stage(C* v, int64_t m, int64_t h) {
  for (int64_t i = 0; i < m; i += 2 * h) {
    C* p = v + i;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const C a = p[j], b = p[j + h];
      p[j] = a + b, p[j + h] = a - b;
    }
  }
}

// Stages h = from, 2·from, ... below `to` on v[0, m), three at a time where possible.
template <typename C>
inline void stages(C* v, int64_t m, int64_t from, int64_t to) {
  int64_t h = from;
  for (; 8 * h <= to; h *= 8) radix8_stage(v, m, h);
  if (4 * h <= to) {
    radix4_stage(v, m, h);
  } else if (h < to) {
    radix2_stage(v, m, h);
  }
}

// The early stages run on one L1-sized block at a time, so a long row crosses memory once for
// them rather than once per pass.
constexpr int64_t kBlock = 2048;

// dst ← src · S_m · scale (unnormalized Sylvester S_m; its stages commute, so any order works).
template <typename C>
inline void butterfly(const C* src, C* dst, int64_t m, C scale) {
  constexpr int64_t lanes = Vec<C>::kLanes;
  if (m < lanes) {
    for (int64_t i = 0; i < m; ++i) dst[i] = src[i] * scale;
    stages(dst, m, 1, m);
    return;
  }
  const int64_t block = std::min(m, kBlock);
  const int64_t group = std::min<int64_t>(m / lanes, 8);
  for (int64_t b = 0; b < m; b += block) {
    switch (group) {
      case 8: first_pass<C, 8>(src + b, dst + b, block, scale); break;
      case 4: first_pass<C, 4>(src + b, dst + b, block, scale); break;
      case 2: first_pass<C, 2>(src + b, dst + b, block, scale); break;
      default: first_pass<C, 1>(src + b, dst + b, block, scale); break;
    }
    stages(dst + b, block, lanes * group, block);
  }
  stages(dst, m, block, m);
}

// Where in multiply_k's staged sums each output finds its signed sum of a quad of inputs:
// entry [c·(K/4) + q] is the byte offset of sums[q][bits][0], where bit j of `bits` is set when
// H_K[4q + j][c] = -1. Built once per process and table, so the hot loop reads one offset per
// output and quad, with no branch and no index arithmetic.
template <int kVecs, typename V>
const uint16_t* quad_offsets(const HadamardSize& size) {
  static_assert(kMaxTableK / 4 * 16 * kVecs * sizeof(V) <= UINT16_MAX);
  constexpr int kTables = sizeof(kHadamardTables) / sizeof(kHadamardTables[0]);
  static std::once_flag once[kTables];
  static std::unique_ptr<uint16_t[]> values[kTables];
  const int t = int(std::find_if(std::begin(kHadamardTables), std::end(kHadamardTables),
                                 [&](const HadamardTable& h) { return h.k == size.k; }) -
                    std::begin(kHadamardTables));
  std::call_once(once[t], [&] {
    const int k = size.k, quads = k / 4;
    values[t].reset(new uint16_t[k * quads]);
    for (int c = 0; c < k; ++c) {
      for (int q = 0; q < quads; ++q) {
        int bits = 0;
        for (int j = 0; j < 4; ++j) bits |= int(size.signs[(4 * q + j) * k + c] == '-') << j;
        values[t][c * quads + q] = uint16_t((q * 16 + bits) * kVecs * sizeof(V));
      }
    }
  });
  return values[t].get();
}

// p[bits] ← Σ_j ±x_j, minus where bit j of `bits` is set: all 16 signed sums of four vectors
// in 12 additions and 8 negations.
template <typename V>
inline void signed_sums(V x0, V x1, V x2, V x3, V* p) {
  const V s01 = x0 + x1, d01 = x0 - x1, s23 = x2 + x3, d23 = x2 - x3;
  p[0b0000] = s01 + s23, p[0b0100] = s01 - d23, p[0b1000] = s01 + d23, p[0b1100] = s01 - s23;
  p[0b0010] = d01 + s23, p[0b0110] = d01 - d23, p[0b1010] = d01 + d23, p[0b1110] = d01 - s23;
  for (int bits = 1; bits < 16; bits += 2) p[bits] = -p[bits ^ 0b1111];
}

// v ← v · (H_K ⊗ I_m): out[c·m + d] = Σ_a H_K[a][c] · v[a·m + d]. Column c of H_K meets the K
// index because (H_K ⊗ S)[(a,b),(c,d)] = H_K[a,c]·S[b,d]. H_K holds only ±1, so the 16 signed
// sums of each quad of inputs are formed once and every output adds one of them per quad:
// K²/4 + 5K additions instead of K² multiply-adds (every supported K is a multiple of 4).
// Blocked like a GEMM micro-kernel: a span of two vectors of columns d is staged, and four
// outputs c share the staged sums, so eight accumulators stay in registers.
template <typename C>
inline void multiply_k(C* v, const HadamardSize& size) {
  using V = typename Vec<C>::type;
  constexpr int kVecs = 2;
  constexpr int64_t kSpan = kVecs * Vec<C>::kLanes;
  constexpr int kOuts = 4;
  const int k = size.k, quads = k / 4;
  const int64_t m = size.m;
  const uint16_t* offsets = quad_offsets<kVecs, V>(size);
  V in[kMaxTableK * kVecs];
  V sums[kMaxTableK / 4 * 16 * kVecs];  // [quad][bits][vec]
  for (int64_t d0 = 0; d0 < m; d0 += kSpan) {
    // A span shorter than kSpan happens only when m < kSpan; constant-size copies otherwise,
    // which compile to vector moves rather than library calls.
    const int64_t w = std::min(kSpan, m - d0);
    if (w < kSpan) {
      std::memset(static_cast<void*>(in), 0, sizeof(V) * kVecs * k);
      for (int a = 0; a < k; ++a) std::memcpy(&in[a * kVecs], v + a * m + d0, sizeof(C) * w);
    } else {
      for (int a = 0; a < k; ++a) std::memcpy(&in[a * kVecs], v + a * m + d0, sizeof(V) * kVecs);
    }
    for (int q = 0; q < quads; ++q) {
      for (int u = 0; u < kVecs; ++u) {
        V p[16];
        const V* x = in + 4 * q * kVecs + u;
        signed_sums(x[0], x[kVecs], x[2 * kVecs], x[3 * kVecs], p);
        for (int bits = 0; bits < 16; ++bits) sums[(q * 16 + bits) * kVecs + u] = p[bits];
      }
    }
    for (int c = 0; c < k; c += kOuts) {
      V acc[kOuts][kVecs] = {};
      for (int q = 0; q < quads; ++q) {
        for (int o = 0; o < kOuts; ++o) {
          const V* s = reinterpret_cast<const V*>(reinterpret_cast<const char*>(sums) + offsets[(c + o) * quads + q]);
          for (int u = 0; u < kVecs; ++u) acc[o][u] += s[u];
        }
      }
      for (int o = 0; o < kOuts; ++o) {
        if (w < kSpan) {
          std::memcpy(v + (c + o) * m + d0, acc[o], sizeof(C) * w);
        } else {
          std::memcpy(v + (c + o) * m + d0, acc[o], sizeof(V) * kVecs);
        }
      }
    }
  }
}

// dst ← src · H_n (C is float or double; src may equal dst).
template <typename C>
inline void transform(const C* src, C* dst, const HadamardSize& size) {
  const C scale = C(1) / std::sqrt(C(size.n));
  for (int a = 0; a < size.k; ++a) butterfly(src + a * size.m, dst + a * size.m, size.m, scale);
  if (size.k > 1) multiply_k(dst, size);
}

}  // namespace detail

// The compute type: half-precision rows are widened to float and rounded once at the end.
template <typename T>
using ComputeType = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows [begin, end) of x (each size.n long, contiguous) into y; x may equal y. `work` holds
// size.n values of ComputeType<T> and is only used when T is narrower than its compute type.
template <typename T>
void transform_rows(const T* x, T* y, int64_t begin, int64_t end, const HadamardSize& size,
                    ComputeType<T>* work) {
  using C = ComputeType<T>;
  const int64_t n = size.n;
  for (int64_t r = begin; r < end; ++r) {
    const T* src = x + r * n;
    T* dst = y + r * n;
    if constexpr (std::is_same_v<T, C>) {
      detail::transform(src, dst, size);
    } else {
      for (int64_t i = 0; i < n; ++i) work[i] = static_cast<C>(src[i]);
      detail::transform(work, work, size);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(work[i]);
    }
  }
}

}  // namespace spinquant
