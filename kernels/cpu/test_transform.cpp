// Checks the transform itself (hadamard_transform.h) against the dense reference for every
// supported K, in float and double, in place. No ExecuTorch: besides the host build, the Python
// tests cross-compile it for arm64 and run it under qemu, so the NEON code runs too. Built with
// -DSPINQUANT_SANITIZE=ON by scripts/sanitize_kernels.sh as well.
#include <vector>

#include "hadamard_transform.h"
#include "test_reference.h"

using spinquant::testing::dense;
using spinquant::testing::expect;
using spinquant::testing::random_rows;
using spinquant::testing::relative_error;

namespace {

template <typename T>
double core_error(const std::vector<double>& x, const std::vector<double>& h, const spinquant::HadamardSize& s) {
  std::vector<T> y(x.begin(), x.end());
  std::vector<spinquant::ComputeType<T>> work(s.n);
  spinquant::transform_rows(y.data(), y.data(), 0, int64_t(x.size()) / s.n, s, work.data());  // in place
  return relative_error(x, y, h, s.n);
}

void check_core(int64_t k, int64_t m) {
  spinquant::HadamardSize s;
  const int64_t n = k * m;
  // 40·2^m comes back as 20·2^(m+1), the smaller K, as in Python.
  expect(spinquant::factor_size(n, &s) && s.k * s.m == n && s.k <= k, "factor_size", n);
  const auto x = random_rows(n > 1024 ? 1 : 3, n, unsigned(n));  // the reference costs n² a row
  const auto h = dense(s);
  expect(core_error<float>(x, h, s) < 1e-5, "float transform vs dense", n);
  expect(core_error<double>(x, h, s) < 1e-12, "double transform vs dense", n);
}

}  // namespace

int main() {
  std::vector<int64_t> ks{1};
  for (const auto& t : spinquant::kHadamardTables) ks.push_back(t.k);
  for (int64_t k : ks) {
    for (int64_t m : {1, 2, 4, 8, 16, 32}) {
      if (k * m <= 3072) check_core(k, m);  // m ≥ 16 reaches every full-width vector path
    }
  }
  for (int64_t m : {256, 4096}) check_core(1, m);  // 4096 > the cache block
  return spinquant::testing::report();
}
