// spinquant::rms_norm.out: x / sqrt(mean(x²) + eps) over the last dimension, times an optional gain. Written as
// ExecuTorch's CPU kernels, the norm is five calls (mul, mean, add, rsqrt, mul) per norm, 61 norms a decode step
// on the demo: each call's dispatch costs more than its arithmetic on a 576-float row.
#include <cmath>

#include "fixed_order.h"
#include "kernel_util.h"

namespace spinquant::native {

namespace {

constexpr const char* kOp = "spinquant::rms_norm.out";

void normalize_row(const float* x, const float* gain, int64_t n, float eps, float* out) {
  const float squares = dot_in_fixed_order(x, x, n);
  const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(n) + eps);
  if (gain == nullptr) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) out[d] = x[d] * inverse;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) out[d] = x[d] * inverse * gain[d];
  }
}

}  // namespace

Tensor& rms_norm_out(KernelRuntimeContext& ctx, const Tensor& x, const executorch::aten::optional<Tensor>& weight, double eps,
                     Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && x.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "%s: x and out must be float32 with at least one dimension", kOp);
  ET_KERNEL_CHECK_MSG(ctx, is_plain(x), InvalidArgument, out,
                      "%s: the input must be contiguous", kOp);
  const int64_t n = x.size(x.dim() - 1);
  const float* gain = nullptr;
  if (weight.has_value()) {
    ET_KERNEL_CHECK_MSG(ctx, weight->scalar_type() == ScalarType::Float && weight->numel() == n && tensor_is_contiguous(*weight),
                        InvalidArgument, out, "%s: the gain must be %lld contiguous float32 values", kOp, static_cast<long long>(n));
    gain = weight->const_data_ptr<float>();
  }
  ET_KERNEL_CHECK_MSG(ctx, resize_tensor(out, x.sizes()) == Error::Ok && tensor_is_contiguous(out), InvalidArgument, out,
                      "%s: out cannot take the input's shape", kOp);
  if (x.numel() == 0) return out;
  const float* src = x.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const bool ok = ::executorch::extension::parallel_for(0, x.numel() / n, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) normalize_row(src + row * n, gain, n, static_cast<float>(eps), dst + row * n);
  });
  ET_KERNEL_CHECK_MSG(ctx, ok, Internal, out, "%s: the thread pool failed to run the rows", kOp);
  return out;
}

}  // namespace spinquant::native

EXECUTORCH_LIBRARY(spinquant, "rms_norm.out", spinquant::native::rms_norm_out);
