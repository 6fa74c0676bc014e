// y = x · (scale · W)ᵀ for a weight W (out, in) held as QuIP#'s E8P codes (spinquant/e8p.py): 8 weights per
// 16-bit code, bits 0-7 a pattern of absolute values, bits 8-14 the signs of coordinates 1-7, coordinate 0's sign
// fixed by the pattern's parity, bit 15 the shift (+¼ if set, else -¼). Plain C++17 with no ExecuTorch dependency,
// so the ExecuTorch kernel, the C++ test and the benchmark share it.
//
// Every weight is an odd multiple of ¼ in [-2.75, 2.75], so 4·w is an odd integer in [-11, 11]: a code decodes to
// eight int8 "quarters" with integer operations only (decode_quarters), and those widen to floats exactly.
//
// Summation order, the same on every path (scalar, AVX2, AVX-512, NEON) and for any number of rows: 16 float lanes,
// the even-numbered groups of eight inputs into lanes 0-7 and the odd ones into lanes 8-15, each lane summing
// x·w (a multiply, then an add: no fused multiply-add, CMakeLists.txt's -ffp-contract=off) in group order; then
// lanes i and i+8 added, those eight summed pairwise (fixed_order.h's sum8), and the sum times scale/4 (exact).
// So the decode step (one row) and the prefill (many) give a token the same bits, and so do x86 and arm64.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "e8p_tables.h"
#include "fixed_order.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "decode_quarters packs coordinate j into byte j of a uint64_t");

namespace spinquant {

// Which widening path this build compiled, for the tests to check that each one ran.
#if defined(__AVX512F__)
inline constexpr const char* kE8PPath = "avx512";
#elif defined(__AVX2__)
inline constexpr const char* kE8PPath = "avx2";
#elif defined(__ARM_NEON)
inline constexpr const char* kE8PPath = "neon";
#else
inline constexpr const char* kE8PPath = "scalar";
#endif

// Sixteen floats: two groups of eight. One AVX-512 register; elsewhere two 32-byte halves, as GCC kept a 64-byte
// generic vector in memory on AVX2 and NEON, a store and a load per step (3x slower).
#if defined(__AVX512F__)
typedef float Floats16 __attribute__((vector_size(64)));

inline Floats16 join(Floats8 lo, Floats8 hi) {
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

inline Floats8 low_half(Floats16 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
inline Floats8 high_half(Floats16 v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }
#else
struct Floats16 {
  Floats8 lo, hi;
};

inline Floats16 operator*(Floats16 a, Floats16 b) { return {a.lo * b.lo, a.hi * b.hi}; }
inline Floats16& operator+=(Floats16& a, Floats16 b) {
  a.lo += b.lo, a.hi += b.hi;
  return a;
}

inline Floats16 join(Floats8 lo, Floats8 hi) { return {lo, hi}; }
inline Floats8 low_half(Floats16 v) { return v.lo; }
inline Floats8 high_half(Floats16 v) { return v.hi; }
#endif

namespace detail {

// What the sign bits and the shift do to a pattern's eight bytes: bytes to negate are XORed with 0xFF and get 1
// added (two's complement), and every byte gets ±1, the shift in quarters. `add` holds those per-byte additions as
// one 64-bit number: no byte's sum carries into the next, as |pattern| ≥ 2 > 1, so one 64-bit add does all eight.
struct SignShift {
  uint64_t flip;
  uint64_t add;
};

// Indexed by code >> 8 (bits 0-6 the signs of coordinates 1-7, bit 7 the shift) plus the pattern's parity at bit 8.
struct SignShiftTable {
  SignShift entries[512];
};

constexpr SignShiftTable make_sign_shift_table() {
  SignShiftTable table{};
  for (int i = 0; i < 512; ++i) {
    const int flips = i & 0x7F, shift = i & 0x80 ? 1 : -1, parity = i >> 8;
    const int negative = (flips << 1) | ((__builtin_popcount(flips) + parity) & 1);  // bit j: coordinate j
    uint64_t flip = 0, add = 0;
    for (int j = 0; j < 8; ++j) {
      const int negate = (negative >> j) & 1;
      flip |= uint64_t(negate ? 0xFF : 0) << (8 * j);
      add += uint64_t(int64_t(negate + shift)) << (8 * j);  // modulo 2^64: a -1 borrows from the bytes above
    }
    table.entries[i] = {flip, add};
  }
  return table;
}

inline constexpr SignShiftTable kSignShift = make_sign_shift_table();

// Each pattern's parity already at bit 8 of kSignShift's index: one shift fewer per code (10% of the decode step).
struct ParityIndexTable {
  uint16_t entries[256];
};

constexpr ParityIndexTable make_parity_index_table() {
  ParityIndexTable table{};
  for (int i = 0; i < 256; ++i) table.entries[i] = uint16_t(kE8PParity[i] << 8);
  return table;
}

inline constexpr ParityIndexTable kParityIndex = make_parity_index_table();

// A code's eight weights times 4, as int8 in the bytes of a uint64_t (coordinate j in byte j).
inline uint64_t decode_quarters(uint16_t code) {
  const int pattern_index = code & 0xFF;
  uint64_t pattern;
  std::memcpy(&pattern, kE8PQuarters[pattern_index], sizeof(pattern));
  const SignShift& s = kSignShift.entries[(code >> 8) | kParityIndex.entries[pattern_index]];
  return (pattern ^ s.flip) + s.add;
}

// Two codes' quarters as sixteen floats, a's in lanes 0-7.
inline Floats16 widen(uint64_t a, uint64_t b) {
#if defined(__AVX512F__)
  // The zero-masked forms: GCC 12 warns that the plain ones' _mm512_undefined_* "may be used uninitialized".
  const __m512i ints = _mm512_maskz_cvtepi8_epi32(0xFFFF, _mm_set_epi64x(int64_t(b), int64_t(a)));
  return Floats16(_mm512_maskz_cvtepi32_ps(0xFFFF, ints));
#elif defined(__AVX2__)
  return join(Floats8(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(int64_t(a))))),
              Floats8(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(int64_t(b))))));
#elif defined(__ARM_NEON)
  const int16x8_t a16 = vmovl_s8(vcreate_s8(a)), b16 = vmovl_s8(vcreate_s8(b));
  const float32x4_t a0 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(a16))), a1 = vcvtq_f32_s32(vmovl_high_s16(a16));
  const float32x4_t b0 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(b16))), b1 = vcvtq_f32_s32(vmovl_high_s16(b16));
  return join(__builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7), __builtin_shufflevector(b0, b1, 0, 1, 2, 3, 4, 5, 6, 7));
#else
  Floats8 lo, hi;
  for (int j = 0; j < 8; ++j) {
    lo[j] = float(int8_t(a >> (8 * j)));
    hi[j] = float(int8_t(b >> (8 * j)));
  }
  return join(lo, hi);
#endif
}

// Sixteen inputs from x; a last group of eight alone comes with zeros (its partner weights are zero too).
inline Floats16 load16(const float* x, int count) {
  return join(load8(x), count == 16 ? load8(x + 8) : Floats8{});
}

// The header's summation order, from the sixteen lanes to one float.
inline float sum16(Floats16 acc) {
  return sum8(low_half(acc) + high_half(acc));
}

// One output of one input row, decoding as it goes: the decode step's path, where each code is used once. Four codes
// a step give the decode of the next pair more room beside this pair's arithmetic (15% faster than two).
inline float dot_codes(const float* x, const uint16_t* codes, int64_t groups) {
  Floats16 acc = {};
  int64_t g = 0;
  for (; g + 4 <= groups; g += 4) {
    const Floats16 w0 = widen(decode_quarters(codes[g]), decode_quarters(codes[g + 1]));
    const Floats16 w1 = widen(decode_quarters(codes[g + 2]), decode_quarters(codes[g + 3]));
    acc += load16(x + 8 * g, 16) * w0;
    acc += load16(x + 8 * g + 16, 16) * w1;
  }
  for (; g + 2 <= groups; g += 2) {
    acc += load16(x + 8 * g, 16) * widen(decode_quarters(codes[g]), decode_quarters(codes[g + 1]));
  }
  if (g < groups) acc += load16(x + 8 * g, 8) * widen(decode_quarters(codes[g]), 0);
  return sum16(acc);
}

// One row of codes decoded into `w` ((groups + 1) / 2 vectors, in quarters), for the prefill to reuse over rows.
inline void decode_row(const uint16_t* codes, int64_t groups, Floats16* w) {
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) w[g / 2] = widen(decode_quarters(codes[g]), decode_quarters(codes[g + 1]));
  if (g < groups) w[g / 2] = widen(decode_quarters(codes[g]), 0);
}

// One output of R input rows (x's rows `in` apart) against a decoded row, each in dot_codes' order. R rows at once:
// R independent sums hide the add's latency, and each weight vector loaded serves them all.
template <int R>
inline void dot_decoded(const float* x, int64_t in, const Floats16* w, int64_t groups, float* y, int64_t y_stride) {
  Floats16 acc[R] = {};
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    for (int r = 0; r < R; ++r) acc[r] += load16(x + r * in + 8 * g, 16) * w[g / 2];
  }
  if (g < groups) {
    for (int r = 0; r < R; ++r) acc[r] += load16(x + r * in + 8 * g, 8) * w[g / 2];
  }
  for (int r = 0; r < R; ++r) y[r * y_stride] = sum16(acc[r]);
}

}  // namespace detail

// Scratch for e8p_linear_outputs when rows > 1: one decoded row of `in` weights.
inline std::unique_ptr<Floats16[]> e8p_scratch(int64_t in) {
  return std::unique_ptr<Floats16[]>(new Floats16[(in / 8 + 1) / 2]);
}

// Outputs [begin, end) of y (rows, out) = x (rows, in) · (scale · W)ᵀ, W given by `codes` (out, in/8), in a
// multiple of 8. One input row decodes each code as it is used; more rows decode each output's codes once into
// `scratch` (from e8p_scratch(in)) and reuse them for every row.
inline void e8p_linear_outputs(const float* x, const uint16_t* codes, float scale, int64_t rows, int64_t in,
                               int64_t out, int64_t begin, int64_t end, float* y, Floats16* scratch) {
  const int64_t groups = in / 8;
  const float quarter_scale = scale * 0.25f;
  for (int64_t o = begin; o < end; ++o) {
    const uint16_t* row_codes = codes + o * groups;
    if (rows == 1) {
      y[o] = quarter_scale * detail::dot_codes(x, row_codes, groups);
      continue;
    }
    detail::decode_row(row_codes, groups, scratch);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) detail::dot_decoded<4>(x + r * in, in, scratch, groups, y + r * out + o, out);
    for (; r < rows; ++r) detail::dot_decoded<1>(x + r * in, in, scratch, groups, y + r * out + o, out);
    for (r = 0; r < rows; ++r) y[r * out + o] *= quarter_scale;
  }
}

}  // namespace spinquant
