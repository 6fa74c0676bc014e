// spinquant::rope.out: rotary position embedding in Hugging Face's half-split layout, queries and keys of a layer in
// one call. As ExecuTorch's CPU kernels it is six calls per layer (slice, neg, cat, mul, mul, add).
#include "kernel_util.h"

namespace spinquant::native {

namespace {

constexpr const char* kOp = "spinquant::rope.out";

// out = x·cos + rotate_half(x)·sin over the first `turned` values (rotate_half(x) = [-x₂, x₁]); the rest of the
// head (partial rotary) passes unturned.
void rope_row(const float* x, const float* cos, const float* sin, int64_t turned, int64_t dim, float* out) {
  const int64_t half = turned / 2;
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) out[d] = x[d] * cos[d] - x[d + half] * sin[d];
#pragma omp simd
  for (int64_t d = half; d < turned; ++d) out[d] = x[d] * cos[d] + x[d - half] * sin[d];
  for (int64_t d = turned; d < dim; ++d) out[d] = x[d];
}

}  // namespace

Tensor& rope_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.dim() == 4 && cos.dim() == 4 && sin.dim() == 4, InvalidArgument, out,
                      "%s: x must be (batch, seq, heads, head_dim), cos and sin (batch, seq, 1, turned)", kOp);
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && cos.scalar_type() == ScalarType::Float &&
                               sin.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "%s: every tensor must be float32", kOp);
  const int64_t tokens = x.size(0) * x.size(1), heads = x.size(2), dim = x.size(3), turned = cos.size(3);
  ET_KERNEL_CHECK_MSG(ctx, cos.sizes() == sin.sizes() && cos.size(0) * cos.size(1) == tokens && cos.size(2) == 1 &&
                               turned <= dim && turned % 2 == 0,
                      InvalidArgument, out, "%s: cos and sin must be (batch, seq, 1, an even count up to head_dim)", kOp);
  ET_KERNEL_CHECK_MSG(ctx, is_plain(x) && tensor_is_contiguous(cos) &&
                               tensor_is_contiguous(sin),
                      InvalidArgument, out, "%s: the inputs must be contiguous", kOp);
  ET_KERNEL_CHECK_MSG(ctx, resize_tensor(out, x.sizes()) == Error::Ok && tensor_is_contiguous(out), InvalidArgument, out,
                      "%s: out cannot take x's shape", kOp);
  if (x.numel() == 0) return out;
  const float* src = x.const_data_ptr<float>();
  const float* c = cos.const_data_ptr<float>();
  const float* s = sin.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const bool ok = ::executorch::extension::parallel_for(0, tokens * heads, std::max<int64_t>(1, 16384 / dim), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t token = row / heads;
      rope_row(src + row * dim, c + token * turned, s + token * turned, turned, dim, dst + row * dim);
    }
  });
  ET_KERNEL_CHECK_MSG(ctx, ok, Internal, out, "%s: the thread pool failed to run the rows", kOp);
  return out;
}

}  // namespace spinquant::native

EXECUTORCH_LIBRARY(spinquant, "rope.out", spinquant::native::rope_out);
