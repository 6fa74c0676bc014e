// spinquant::e8p_linear.out: y = x · (scale · W)ᵀ with W held as QuIP#'s E8P codes, 2 bits a weight
// (e8p_linear.h). Output rows are spread over ExecuTorch's thread pool; each task decodes its own rows' codes.
#include <memory>

#include "e8p_linear.h"
#include "kernel_util.h"

namespace spinquant::native {

namespace {

constexpr const char* kOp = "spinquant::e8p_linear.out";

// Output rows per thread-pool task: enough multiply-adds that a task outweighs waking a thread.
int64_t grain_outputs(int64_t in, int64_t rows) {
  return std::max<int64_t>(1, 16384 / (in * rows));
}

bool check_inputs(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& scale, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && x.scalar_type() == ScalarType::Float && is_plain(x), InvalidArgument, false,
                      "%s: x must be contiguous float32 with at least one dimension", kOp);
  ET_KERNEL_CHECK_MSG(ctx, codes.dim() == 2 && codes.size(1) > 0 && codes.scalar_type() == ScalarType::Short && is_plain(codes),
                      InvalidArgument, false, "%s: codes must be contiguous int16 (out_features, in_features / 8 > 0)", kOp);
  ET_KERNEL_CHECK_MSG(ctx, x.size(x.dim() - 1) == 8 * codes.size(1), InvalidArgument, false,
                      "%s: x has %lld features, the codes hold %lld", kOp,
                      static_cast<long long>(x.size(x.dim() - 1)), static_cast<long long>(8 * codes.size(1)));
  ET_KERNEL_CHECK_MSG(ctx, scale.scalar_type() == ScalarType::Float && scale.numel() == 1, InvalidArgument, false,
                      "%s: scale must be one float32", kOp);
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == ScalarType::Float, InvalidArgument, false, "%s: out must be float32", kOp);
  ET_KERNEL_CHECK_MSG(ctx, resize_with_last_dim(out, x, codes.size(0)) == Error::Ok && is_plain(out), InvalidArgument,
                      false, "%s: out cannot take x's shape with out_features last", kOp);
  return true;
}

}  // namespace

Tensor& e8p_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& scale,
                       Tensor& out) {
  if (!check_inputs(ctx, x, codes, scale, out)) return out;
  if (out.numel() == 0) return out;
  const int64_t in = x.size(x.dim() - 1), out_features = codes.size(0), rows = x.numel() / in;
  const float* src = x.const_data_ptr<float>();
  // The codes are uint16 bit patterns stored as int16: the same bytes, read unsigned.
  const uint16_t* code_data = reinterpret_cast<const uint16_t*>(codes.const_data_ptr<int16_t>());
  const float s = *scale.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const bool ok = ::executorch::extension::parallel_for(0, out_features, grain_outputs(in, rows), [&](int64_t begin, int64_t end) {
    // Heap scratch, only for several rows: the runtime context's temp allocator is optional.
    std::unique_ptr<Floats16[]> scratch;
    if (rows > 1) scratch = e8p_scratch(in);
    e8p_linear_outputs(src, code_data, s, rows, in, out_features, begin, end, dst, scratch.get());
  });
  ET_KERNEL_CHECK_MSG(ctx, ok, Internal, out, "%s: the thread pool failed to run the outputs", kOp);
  return out;
}

}  // namespace spinquant::native

EXECUTORCH_LIBRARY(spinquant, "e8p_linear.out", spinquant::native::e8p_linear_out);
