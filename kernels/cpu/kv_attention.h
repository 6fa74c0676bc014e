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

// Four positions' rows as floats, with their scales. An int8 row is widened once into scratch for all the query heads
// that read it (three in the demo, four in Llama 3.2 1B), not once per head: the demo's attention 20% faster
// (results/decode_profile_smollm2.md).
struct Rows4 {
  const float* row[4];
  float scale[4];
};

inline Rows4 rows4(const float* first, int64_t stride, int64_t, float*) {
  return {{first, first + stride, first + 2 * stride, first + 3 * stride}, {1.0f, 1.0f, 1.0f, 1.0f}};
}

inline Rows4 rows4(const int8_t* first, int64_t stride, int64_t dim, float* scratch) {
  Rows4 rows;
  for (int r = 0; r < 4; ++r) {
    const int8_t* row = first + r * stride;
    float* wide = scratch + r * dim;
    int64_t d = 0;
    for (; d + kLanes <= dim; d += kLanes) {
      const Floats8 v = load8(row + d);
      std::memcpy(wide + d, &v, sizeof(v));
    }
    for (; d < dim; ++d) wide[d] = static_cast<float>(row[d]);
    rows.row[r] = wide;
    rows.scale[r] = row_scale(row, dim);
  }
  return rows;
}

// scores[0..4) = q · k_j for four positions at once: four independent sums keep the vector units busy.
inline void dot4(const float* q, const Rows4& k, int64_t dim, float* scores) {
  Floats8 sums[4] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    const Floats8 x = load8(q + d);
    for (int r = 0; r < 4; ++r) sums[r] += x * load8(k.row[r] + d);
  }
  for (int r = 0; r < 4; ++r) {
    float sum = sum8(sums[r]);
    for (int64_t e = d; e < dim; ++e) sum += q[e] * k.row[r][e];
    scores[r] = sum * k.scale[r];
  }
}

template <typename Row>
float dot(const float* q, const Row* k, int64_t dim) {
  float sum = 0.0f;
  for (int64_t d = 0; d < dim; ++d) sum += q[d] * static_cast<float>(k[d]);
  return sum * row_scale(k, dim);
}

// out += Σ_j w_j · v_j over four positions: out is read and written once per four rows.
inline void add_scaled4(const float* w, const Rows4& v, int64_t dim, float* out) {
  float weights[4];
  for (int r = 0; r < 4; ++r) weights[r] = w[r] * v.scale[r];
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    Floats8 o = load8(out + d);
    o += (weights[0] * load8(v.row[0] + d) + weights[1] * load8(v.row[1] + d)) +
         (weights[2] * load8(v.row[2] + d) + weights[3] * load8(v.row[3] + d));
    std::memcpy(out + d, &o, sizeof(o));
  }
  for (; d < dim; ++d) {
    for (int r = 0; r < 4; ++r) out[d] += weights[r] * v.row[r][d];
  }
}

template <typename Row>
void add_scaled(float weight, const Row* v, int64_t dim, float* out) {
  weight *= row_scale(v, dim);
  for (int64_t d = 0; d < dim; ++d) out[d] += weight * static_cast<float>(v[d]);
}

// scores ← softmax(scale · scores), in place.
inline void softmax(float* scores, int64_t rows, float scale) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < rows; ++j) top = std::max(top, scores[j]);
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
// (q and out: `heads` rows of `dim`; scores: heads × rows floats; wide: 4 × dim floats). The heads go through each
// block of four positions together, so a long context's keys and values are read from memory once, not once per head.
template <typename Row>
void attend_group(const float* q, int64_t heads, const CacheView<Row>& cache, int64_t dim, float scale, float* scores,
                  float* wide, float* out) {
  const int64_t rows = cache.rows, blocked = rows - rows % 4;
  for (int64_t j = 0; j < blocked; j += 4) {
    const Rows4 k = rows4(cache.k + j * cache.stride, cache.stride, dim, wide);
    for (int64_t h = 0; h < heads; ++h) dot4(q + h * dim, k, dim, scores + h * rows + j);
  }
  for (int64_t j = blocked; j < rows; ++j) {
    for (int64_t h = 0; h < heads; ++h) scores[h * rows + j] = dot(q + h * dim, cache.k + j * cache.stride, dim);
  }
  for (int64_t h = 0; h < heads; ++h) softmax(scores + h * rows, rows, scale);
  std::fill(out, out + heads * dim, 0.0f);
  for (int64_t j = 0; j < blocked; j += 4) {
    const Rows4 v = rows4(cache.v + j * cache.stride, cache.stride, dim, wide);
    for (int64_t h = 0; h < heads; ++h) add_scaled4(scores + h * rows + j, v, dim, out + h * dim);
  }
  for (int64_t j = blocked; j < rows; ++j) {
    for (int64_t h = 0; h < heads; ++h) add_scaled(scores[h * rows + j], cache.v + j * cache.stride, dim, out + h * dim);
  }
}

}  // namespace spinquant
