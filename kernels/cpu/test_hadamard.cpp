// Checks the kernel against a dense double-precision H_n built straight from the tables, and
// checks that bad inputs fail the kernel context instead of computing. Built with
// -DSPINQUANT_SANITIZE=ON by scripts/sanitize_kernels.sh, so out-of-bounds access and undefined
// behaviour in any of these paths stop the run.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include <executorch/runtime/platform/runtime.h>

#include "hadamard_transform.h"
#include "op_hadamard_transform.h"

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const char* what, long long n) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s (n = %lld)\n", what, n);
  }
}

// Dense H_n[(a,b),(c,d)] = H_K[a][c] · (-1)^popcount(b & d) / √n, in double.
std::vector<double> dense(const spinquant::HadamardSize& s) {
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
double relative_error(const std::vector<double>& x, const std::vector<T>& y, const std::vector<double>& h,
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

std::vector<double> random_rows(int64_t rows, int64_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist;
  std::vector<double> x(rows * n);
  for (double& v : x) v = dist(gen);
  return x;
}

// An ExecuTorch tensor over its own storage; `transposed` lays a 2-D tensor out column-major.
struct HostTensor {
  std::vector<TensorImpl::SizesType> sizes;
  std::vector<TensorImpl::DimOrderType> dim_order;
  std::vector<TensorImpl::StridesType> strides;
  std::vector<unsigned char> bytes;
  std::unique_ptr<TensorImpl> impl;
  Tensor tensor() { return Tensor(impl.get()); }
};

std::unique_ptr<HostTensor> make_tensor(ScalarType dtype, std::vector<int> shape, bool transposed = false) {
  auto t = std::make_unique<HostTensor>();
  const size_t dim = shape.size();
  int64_t numel = 1;
  for (int s : shape) {
    t->sizes.push_back(s);
    numel *= s;
  }
  t->dim_order.resize(dim);
  t->strides.resize(dim);
  for (size_t i = 0; i < dim; ++i) t->dim_order[i] = transposed ? dim - 1 - i : i;
  int64_t stride = 1;
  for (size_t i = dim; i-- > 0;) {
    const size_t d = t->dim_order[i];
    t->strides[d] = stride;
    stride *= shape[d];
  }
  t->bytes.resize(numel * executorch::runtime::elementSize(dtype));
  t->impl = std::make_unique<TensorImpl>(dtype, dim, t->sizes.data(), t->bytes.data(), t->dim_order.data(),
                                         t->strides.data());
  return t;
}

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

// Through the registered kernel: every dtype, enough rows for the thread pool to split them.
template <typename T>
void check_kernel(ScalarType dtype, int64_t n, int rows, double tolerance) {
  spinquant::HadamardSize s;
  spinquant::factor_size(n, &s);
  auto x = make_tensor(dtype, {rows, int(n)});
  auto out = make_tensor(dtype, {rows, int(n)});
  const auto values = random_rows(rows, n, 7);
  T* xp = x->tensor().mutable_data_ptr<T>();
  for (size_t i = 0; i < values.size(); ++i) xp[i] = T(values[i]);
  std::vector<double> rounded(xp, xp + values.size());
  KernelRuntimeContext ctx;
  Tensor xt = x->tensor(), ot = out->tensor();
  spinquant::native::hadamard_transform_out(ctx, xt, ot);
  expect(ctx.failure_state() == Error::Ok, "kernel ran", n);
  const T* yp = ot.const_data_ptr<T>();
  std::vector<T> y(yp, yp + values.size());
  expect(relative_error(rounded, y, dense(s), n) < tolerance, "kernel vs dense", n);
}

bool kernel_fails(ScalarType dtype, std::vector<int> shape, ScalarType out_dtype, std::vector<int> out_shape,
                  bool transposed = false) {
  auto x = make_tensor(dtype, shape, transposed);
  auto out = make_tensor(out_dtype, out_shape);
  KernelRuntimeContext ctx;
  Tensor xt = x->tensor(), ot = out->tensor();
  spinquant::native::hadamard_transform_out(ctx, xt, ot);
  return ctx.failure_state() == Error::InvalidArgument;
}

}  // namespace

int main() {
  executorch::runtime::runtime_init();
  std::vector<int64_t> ks{1};
  for (const auto& t : spinquant::kHadamardTables) ks.push_back(t.k);
  for (int64_t k : ks) {
    for (int64_t m : {1, 2, 4, 8, 16, 32}) {
      if (k * m <= 3072) check_core(k, m);  // m ≥ 16 reaches every full-width vector path
    }
  }
  for (int64_t m : {256, 4096}) check_core(1, m);  // 4096 > the cache block

  using executorch::aten::BFloat16;
  using executorch::aten::Half;
  for (int64_t n : {12, 1536, 1792}) {
    check_kernel<float>(ScalarType::Float, n, 17, 1e-5);
    check_kernel<double>(ScalarType::Double, n, 5, 1e-12);
    check_kernel<Half>(ScalarType::Half, n, 9, 2e-3);
    check_kernel<BFloat16>(ScalarType::BFloat16, n, 9, 2e-2);
  }

  const auto F = ScalarType::Float;
  expect(kernel_fails(F, {2, 4864}, F, {2, 4864}), "size 4864 = 19*256 is refused", 4864);
  expect(kernel_fails(ScalarType::Int, {2, 64}, ScalarType::Int, {2, 64}), "int dtype is refused", 64);
  expect(kernel_fails(F, {2, 64}, ScalarType::Half, {2, 64}), "out dtype mismatch is refused", 64);
  expect(kernel_fails(F, {2, 64}, F, {3, 64}), "out of another static shape is refused", 64);
  expect(kernel_fails(F, {64, 64}, F, {64, 64}, /*transposed=*/true), "non-contiguous input is refused", 64);
  expect(kernel_fails(F, {}, F, {}), "a 0-d input is refused", 1);

  std::printf("%s: %d checks, %d failures\n", failures ? "FAILED" : "ok", checks, failures);
  return failures ? 1 : 0;
}
