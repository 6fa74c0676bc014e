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

inline float dot(const float* q, const float* k, int64_t dim) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < dim; ++d) sum += q[d] * k[d];
  return sum;
}

inline float dot(const float* q, const int8_t* k, int64_t dim) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < dim; ++d) sum += q[d] * static_cast<float>(k[d]);
  return row_scale(k, dim) * sum;
}

inline void add_scaled(float weight, const float* v, int64_t dim, float* out) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) out[d] += weight * v[d];
}

inline void add_scaled(float weight, const int8_t* v, int64_t dim, float* out) {
  weight *= row_scale(v, dim);
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) out[d] += weight * static_cast<float>(v[d]);
}

// e^x for x <= 0, Cephes' expf (relative error about 1e-7): libm's exp does not vectorize, and a
// softmax over a 2,048-token context calls it 2,048 times per head and layer.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // e^-87 is about FLT_MIN: 2^n below stays a normal float
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n·ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}

// Where one query row attends: the cache of its head's group, `rows` positions visible, `stride`
// elements from one position's row of that head to the next position's.
template <typename Row>
struct CacheView {
  const Row* k;
  const Row* v;
  int64_t rows;
  int64_t stride;
};

// out = softmax(scale · q·kᵀ) · v over positions [0, rows); `scores` holds `rows` floats.
template <typename Row>
void attend_row(const float* q, const CacheView<Row>& cache, int64_t dim, float scale, float* scores, float* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < cache.rows; ++j) {
    scores[j] = scale * dot(q, cache.k + j * cache.stride, dim);
    top = std::max(top, scores[j]);
  }
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < cache.rows; ++j) {
    scores[j] = exp_nonpositive(scores[j] - top);
    total += scores[j];
  }
  std::fill(out, out + dim, 0.0f);
  const float normalize = 1.0f / total;
  for (int64_t j = 0; j < cache.rows; ++j) add_scaled(scores[j] * normalize, cache.v + j * cache.stride, dim, out);
}

}  // namespace spinquant
