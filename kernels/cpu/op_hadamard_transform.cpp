#include "op_hadamard_transform.h"

#include <memory>

#include "hadamard_transform.h"
#include "kernel_util.h"

namespace spinquant::native {

namespace {

constexpr const char* kOp = "spinquant::hadamard_transform.out";

// Rows per thread-pool task: enough elements that a task outweighs waking a thread.
int64_t grain_rows(int64_t n) {
  return std::max<int64_t>(1, 16384 / n);
}

template <typename T>
bool run(const Tensor& x, Tensor& out, const HadamardSize& size) {
  const T* src = x.const_data_ptr<T>();
  T* dst = out.mutable_data_ptr<T>();
  const int64_t rows = x.numel() / size.n;
  return ::executorch::extension::parallel_for(0, rows, grain_rows(size.n), [&](int64_t begin, int64_t end) {
    // Heap scratch, only for half types: the runtime context's temp allocator is optional.
    std::unique_ptr<ComputeType<T>[]> work;
    if constexpr (!std::is_same_v<T, ComputeType<T>>) work.reset(new ComputeType<T>[size.n]);
    transform_rows(src, dst, begin, end, size, work.get());
  });
}

}  // namespace

Tensor& hadamard_transform_out(KernelRuntimeContext& ctx, const Tensor& x, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1, InvalidArgument, out, "%s: the input needs at least one dimension", kOp);
  const ScalarType dtype = x.scalar_type();
  ET_KERNEL_CHECK_MSG(ctx,
                      dtype == ScalarType::Float || dtype == ScalarType::Double ||
                          dtype == ScalarType::Half || dtype == ScalarType::BFloat16,
                      InvalidArgument, out, "%s: dtype %s is not supported (Float, Double, Half, BFloat16)", kOp,
                      executorch::runtime::toString(dtype));
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == dtype, InvalidArgument, out,
                      "%s: out has dtype %s, the input %s", kOp, executorch::runtime::toString(out.scalar_type()),
                      executorch::runtime::toString(dtype));
  ET_KERNEL_CHECK_MSG(ctx, is_plain(x), InvalidArgument, out,
                      "%s: the input must be contiguous", kOp);
  ET_KERNEL_CHECK_MSG(ctx, resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument, out,
                      "%s: out cannot take the input's shape", kOp);
  ET_KERNEL_CHECK_MSG(ctx, is_plain(out), InvalidArgument, out,
                      "%s: out must be contiguous", kOp);
  HadamardSize size;
  const int64_t n = x.size(x.dim() - 1);
  ET_KERNEL_CHECK_MSG(ctx, factor_size(n, &size), InvalidArgument, out,
                      "%s: no Hadamard matrix of size %lld (sizes are K*2^m with K in %s)", kOp,
                      static_cast<long long>(n), kSupportedK);
  if (x.numel() == 0) return out;
  bool ok = false;
  switch (dtype) {
    case ScalarType::Float: ok = run<float>(x, out, size); break;
    case ScalarType::Double: ok = run<double>(x, out, size); break;
    case ScalarType::Half: ok = run<executorch::aten::Half>(x, out, size); break;
    default: ok = run<executorch::aten::BFloat16>(x, out, size); break;
  }
  ET_KERNEL_CHECK_MSG(ctx, ok, Internal, out, "%s: the thread pool failed to run the rows", kOp);
  return out;
}

}  // namespace spinquant::native

EXECUTORCH_LIBRARY(spinquant, "hadamard_transform.out", spinquant::native::hadamard_transform_out);
