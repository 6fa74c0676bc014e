// The C++ tests' reference: a dense double-precision H_n built straight from the tables, and the
// error of a result against it. No ExecuTorch, so the transform's own test builds for any target.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "hadamard_transform.h"

namespace spinquant::testing {

inline int failures = 0;
inline int checks = 0;

inline void expect(bool ok, const char* what, long long n) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s (n = %lld)\n", what, n);
  }
}

// Dense H_n[(a,b),(c,d)] = H_K[a][c] · (-1)^popcount(b & d) / √n, in double.
inline std::vector<double> dense(const spinquant::HadamardSize& s) {
  std::vector<double> h(s.n * s.n);
  const double scale = 1.0 / std::sqrt(double(s.n));
  for (int64_t i = 0; i < s.n; ++i) {
    for (int64_t j = 0; j < s.n; ++j) {
      const int64_t a = i / s.m, b = i % s.m, c = j / s.m, d = j % s.m;
      const double hk = s.k == 1 ? 1.0 : (s.signs[a * s.k + c] == '+' ? 1.0 : -1.0);
      h[i * s.n + j] = hk * (__builtin_popcountll(b & d) % 2 ? -1.0 : 1.0) * scale;
    }
  }
  return h;
}

// max |y - x·H| / ‖x·H‖ over rows.
template <typename T>
inline double relative_error(const std::vector<double>& x, const std::vector<T>& y, const std::vector<double>& h,
                             int64_t n) {
  double worst = 0;
  for (size_t r = 0; r < x.size() / n; ++r) {
    double err = 0, norm = 0;
    for (int64_t j = 0; j < n; ++j) {
      double ref = 0;
      for (int64_t i = 0; i < n; ++i) ref += x[r * n + i] * h[i * n + j];
      err = std::max(err, std::abs(double(y[r * n + j]) - ref));
      norm += ref * ref;
    }
    worst = std::max(worst, err / std::sqrt(norm));
  }
  return worst;
}

inline std::vector<double> random_rows(int64_t rows, int64_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist;
  std::vector<double> x(rows * n);
  for (double& v : x) v = dist(gen);
  return x;
}

// "ok: N checks, 0 failures" (what the Python tests look for) and the exit status.
inline int report() {
  std::printf("%s: %d checks, %d failures\n", failures ? "FAILED" : "ok", checks, failures);
  return failures ? 1 : 0;
}

}  // namespace spinquant::testing
