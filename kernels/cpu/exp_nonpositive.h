// e^x for x <= 0 in plain arithmetic the compiler vectorizes (x86 and arm64 alike), for the kernels' softmax and SiLU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace spinquant {

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

}  // namespace spinquant
