// Checks the registered ExecuTorch kernel against the dense reference in every dtype, and that bad
// inputs fail the kernel context instead of computing (test_transform.cpp checks every K). Built with
// -DSPINQUANT_SANITIZE=ON by scripts/sanitize_kernels.sh, so out-of-bounds access and undefined
// behaviour in any of these paths stop the run.
#include <memory>
#include <vector>

#include <executorch/runtime/platform/runtime.h>

#include "hadamard_transform.h"
#include "op_hadamard_transform.h"
#include "test_reference.h"

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

using spinquant::testing::dense;
using spinquant::testing::expect;
using spinquant::testing::random_rows;
using spinquant::testing::relative_error;

namespace {

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
  using executorch::aten::BFloat16;
  using executorch::aten::Half;
  for (int64_t n : {12, 1536, 1792}) {
    check_kernel<float>(ScalarType::Float, n, 17, 1e-5);
    check_kernel<double>(ScalarType::Double, n, 5, 1e-12);
    check_kernel<Half>(ScalarType::Half, n, 9, 2e-3);
    check_kernel<BFloat16>(ScalarType::BFloat16, n, 9, 2e-2);
  }

  const auto F = ScalarType::Float;
  expect(kernel_fails(F, {2, 4352}, F, {2, 4352}), "size 4352 = 17*256 is refused", 4352);
  expect(kernel_fails(ScalarType::Int, {2, 64}, ScalarType::Int, {2, 64}), "int dtype is refused", 64);
  expect(kernel_fails(F, {2, 64}, ScalarType::Half, {2, 64}), "out dtype mismatch is refused", 64);
  expect(kernel_fails(F, {2, 64}, F, {3, 64}), "out of another static shape is refused", 64);
  expect(kernel_fails(F, {64, 64}, F, {64, 64}, /*transposed=*/true), "non-contiguous input is refused", 64);
  expect(kernel_fails(F, {}, F, {}), "a 0-d input is refused", 1);

  return spinquant::testing::report();
}
