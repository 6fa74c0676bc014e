// Attention over a static KV cache whose rows are float32 or int8 with their scale, and the int8 row
// format itself. Plain C++17 with no ExecuTorch dependency (op_kv_cache.cpp wraps it); hot loops are
// plain loops over contiguous memory that the compiler vectorizes, on x86 and arm64 alike.
//
// An int8 row is a head's `dim` values, symmetric int8, followed by their float32 scale's 4 bytes
// (llama.cpp's q8_0 keeps its scale beside its block the same way): one row is one tensor row, so
// ExecuTorch's llama::update_cache writes a token's rows and their scales in one call.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "exp_nonpositive.h"
#include "fixed_order.h"

namespace spinquant {

constexpr int64_t kScaleBytes = sizeof(float);

// The scale is max|x| / 127, as llama.cpp's q8_0 (spinquant.quant's narrow symmetric int8): torchao's
// max|x| / 127.5 would put a row's negative extreme on a rounding tie. Values are round(x · (1/scale)),
// to even, clamped to [-128, 127].
inline void quantize_row(const float* x, int64_t dim, int8_t* row) {
  float amax = 0.0f;
  for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float scale = std::max(amax / 127.0f, FLT_MIN);
  const float inverse = 1.0f / scale;
  for (int64_t d = 0; d < dim; ++d) {
    row[d] = static_cast<int8_t>(std::clamp(std::nearbyint(x[d] * inverse), -128.0f, 127.0f));
  }
  std::memcpy(row + dim, &scale, kScaleBytes);
}

inline float row_scale(const int8_t* row, int64_t dim) {
  float scale;
  std::memcpy(&scale, row + dim, kScaleBytes);
  return scale;
}

// The loops below are written in fixed_order.h's eight-lane vectors because GCC's own vectorization of them
// keeps its int8 partial sums in memory (measured: the int8 cache then took twice the float one's time).
typedef int32_t Int32s8 __attribute__((vector_size(32)));

inline Floats8 load8(const int8_t* p) {
  // Lane by lane into int32, then one conversion: GCC makes that one widening load (vpmovsxbd) and one
  // vcvtdq2ps, where int8 vectors converted to float directly go through general registers a lane at a time.
  const Int32s8 wide = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
  return __builtin_convertvector(wide, Floats8);
}

inline float row_scale(const float*, int64_t) { return 1.0f; }

// How many query heads go through a block of four positions together: their 4·H sums, the block's four row chunks and
// a query chunk stay in registers (32 vector registers with AVX-512; 16 with AVX2, and NEON's 32 hold 16 of these).
#if defined(__AVX512F__)
constexpr int kHeadsAtOnce = 4;
#else
constexpr int kHeadsAtOnce = 2;
#endif

// Four positions' rows of one KV head and their scales: each row chunk is loaded (an int8 one widened) once for all the
// query heads that read it (three in the demo, four in Llama 3.2 1B), not once per head.
template <typename Row>
struct Block4 {
  const Row* row[4];
  float scale[4];
};

template <typename Row>
Block4<Row> block4(const Row* first, int64_t stride, int64_t dim) {
  Block4<Row> block;
  for (int r = 0; r < 4; ++r) {
    block.row[r] = first + r * stride;
    block.scale[r] = row_scale(block.row[r], dim);
  }
  return block;
}

// scores[h·stride + r] = q_h · k_r for H query heads (q: H rows of dim) and the block's four positions; each (h, r)
// sums in eight lanes over the row's chunks in order, then fixed_order.h's sum8 and the tail in sequence.
template <int H, typename Row>
void dot4(const float* q, const Block4<Row>& k, int64_t dim, float* scores, int64_t stride) {
  Floats8 sums[H][4] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    const Floats8 chunk[4] = {load8(k.row[0] + d), load8(k.row[1] + d), load8(k.row[2] + d), load8(k.row[3] + d)};
    for (int h = 0; h < H; ++h) {
      const Floats8 x = load8(q + h * dim + d);
      for (int r = 0; r < 4; ++r) sums[h][r] += x * chunk[r];
    }
  }
  for (int h = 0; h < H; ++h) {
    for (int r = 0; r < 4; ++r) {
      float sum = sum8(sums[h][r]);
      for (int64_t e = d; e < dim; ++e) sum += q[h * dim + e] * static_cast<float>(k.row[r][e]);
      scores[h * stride + r] = sum * k.scale[r];
    }
  }
}

// dot4 for all `heads` query heads, kHeadsAtOnce at a time.
template <typename Row>
void dot4_heads(const float* q, int64_t heads, const Block4<Row>& k, int64_t dim, float* scores, int64_t stride) {
  for (int64_t h = 0; h < heads; h += kHeadsAtOnce) {
    const float* qh = q + h * dim;
    float* sh = scores + h * stride;
    switch (std::min<int64_t>(kHeadsAtOnce, heads - h)) {
      case 4: dot4<4>(qh, k, dim, sh, stride); break;
      case 3: dot4<3>(qh, k, dim, sh, stride); break;
      case 2: dot4<2>(qh, k, dim, sh, stride); break;
      default: dot4<1>(qh, k, dim, sh, stride);
    }
  }
}

template <typename Row>
float dot(const float* q, const Row* k, int64_t dim) {
  float sum = 0.0f;
  for (int64_t d = 0; d < dim; ++d) sum += q[d] * static_cast<float>(k[d]);
  return sum * row_scale(k, dim);
}

// out_h += Σ_r w_hr · v_r over the block's four positions for every head h (out: heads rows of dim; w_h: scores + h·stride;
// weights: heads × 4 floats of scratch): out_h is read and written once per block, each v chunk loaded once for all heads.
template <typename Row>
void add_scaled4(const float* w, int64_t stride, int64_t heads, const Block4<Row>& v, int64_t dim, float* weights, float* out) {
  for (int64_t h = 0; h < heads; ++h) {
    for (int r = 0; r < 4; ++r) weights[4 * h + r] = w[h * stride + r] * v.scale[r];
  }
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    const Floats8 chunk[4] = {load8(v.row[0] + d), load8(v.row[1] + d), load8(v.row[2] + d), load8(v.row[3] + d)};
    for (int64_t h = 0; h < heads; ++h) {
      const float* wh = weights + 4 * h;
      Floats8 o = load8(out + h * dim + d);
      o += (wh[0] * chunk[0] + wh[1] * chunk[1]) + (wh[2] * chunk[2] + wh[3] * chunk[3]);
      std::memcpy(out + h * dim + d, &o, sizeof(o));
    }
  }
  for (; d < dim; ++d) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int r = 0; r < 4; ++r) out[h * dim + d] += weights[4 * h + r] * static_cast<float>(v.row[r][d]);
    }
  }
}

template <typename Row>
void add_scaled(float weight, const Row* v, int64_t dim, float* out) {
  weight *= row_scale(v, dim);
  for (int64_t d = 0; d < dim; ++d) out[d] += weight * static_cast<float>(v[d]);
}

// The largest of x[0..n), in eight lanes: GCC keeps a plain std::max loop scalar, one dependent compare per element
// (two thirds of the softmax's time). A maximum does not depend on the order it is taken in.
inline float max_in_lanes(const float* x, int64_t n) {
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  Floats8 lanes = {lowest, lowest, lowest, lowest, lowest, lowest, lowest, lowest};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Floats8 v = load8(x + j);
    lanes = lanes < v ? v : lanes;  // std::max lane by lane
  }
  float top = lowest;
  for (int lane = 0; lane < kLanes; ++lane) top = std::max(top, lanes[lane]);
  for (; j < n; ++j) top = std::max(top, x[j]);
  return top;
}

// scores ← softmax(scale · scores), in place.
inline void softmax(float* scores, int64_t rows, float scale) {
  const float top = max_in_lanes(scores, rows);
#pragma omp simd
  for (int64_t j = 0; j < rows; ++j) scores[j] = exp_nonpositive(scale * (scores[j] - top));
  const float normalize = 1.0f / sum_in_fixed_order(scores, rows);
#pragma omp simd
  for (int64_t j = 0; j < rows; ++j) scores[j] *= normalize;
}

// Where one query row's heads attend: the cache of their group's KV head, `rows` positions visible,
// `stride` elements from one position's row of that head to the next position's.
template <typename Row>
struct CacheView {
  const Row* k;
  const Row* v;
  int64_t rows;
  int64_t stride;
};

// out_h = softmax(scale · q_h·kᵀ) · v over positions [0, rows) for the `heads` query heads that share this KV head
// (q and out: `heads` rows of `dim`; scores: heads × rows floats; weights: heads × 4 floats). The heads go through each
// block of four positions together, so a long context's keys and values are read from memory once, not once per head.
template <typename Row>
void attend_group(const float* q, int64_t heads, const CacheView<Row>& cache, int64_t dim, float scale, float* scores,
                  float* weights, float* out) {
  const int64_t rows = cache.rows, blocked = rows - rows % 4;
  for (int64_t j = 0; j < blocked; j += 4) {
    dot4_heads(q, heads, block4(cache.k + j * cache.stride, cache.stride, dim), dim, scores + j, rows);
  }
  for (int64_t j = blocked; j < rows; ++j) {
    for (int64_t h = 0; h < heads; ++h) scores[h * rows + j] = dot(q + h * dim, cache.k + j * cache.stride, dim);
  }
  for (int64_t h = 0; h < heads; ++h) softmax(scores + h * rows, rows, scale);
  std::fill(out, out + heads * dim, 0.0f);
  for (int64_t j = 0; j < blocked; j += 4) {
    add_scaled4(scores + j, rows, heads, block4(cache.v + j * cache.stride, cache.stride, dim), dim, weights, out);
  }
  for (int64_t j = blocked; j < rows; ++j) {
    for (int64_t h = 0; h < heads; ++h) add_scaled(scores[h * rows + j], cache.v + j * cache.stride, dim, out + h * dim);
  }
}

}  // namespace spinquant
